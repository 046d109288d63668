"""`sandbox pull` against a real registry (Debian's docker-registry on loopback)."""

from __future__ import annotations

import hashlib
import json
import subprocess

import httpx
import pytest

from tests.conftest import Runner

from .conftest import Cli, skopeo_copy, skopeo_digest
from .servers import FaultProxy, Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _layer_types(cli: Cli, name: str) -> list[str]:
    return [layer["mediaType"] for layer in cli.inspect(name)["layers"]]


@pytest.mark.parametrize("tag", ["gzip", "zstd", "v2s2"])
def test_pull_image_pushed_by_skopeo_and_run_a_job(cli: Cli, foreign: str, tag: str) -> None:
    ref = f"{foreign}:{tag}"
    proc = cli.ok("pull", ref)
    lines = proc.stdout.splitlines()
    assert lines[-1] == ref
    digest = skopeo_digest(ref)
    assert f"Digest: {digest}" in lines
    info = cli.inspect(ref)
    assert info["manifest"] == digest  # the registry's bytes, kept exactly
    media = _layer_types(cli, ref)
    expected = {"gzip": "tar+gzip", "zstd": "tar+zstd", "v2s2": "tar.gzip"}[tag]
    assert media[0].endswith(expected), media
    run = cli.ok("exec", "--json", "--image", ref, "sh", "-c", "echo hello $0", tag)
    assert json.loads(run.stdout)["stdout"] == f"hello {tag}\n"
    again = json.loads(cli.ok("pull", "--json", ref).stdout)  # one object for scripts
    assert again == {"name": ref, "digest": digest, "id": info["id"], "downloaded": False}
    if tag == "v2s2":
        return  # skopeo's oci: transport only lists OCI-typed manifests of a layout
    # skopeo reads the store back (an OCI layout) and agrees on the digest
    out = subprocess.run(["skopeo", "inspect", f"oci:{cli.home}:{ref}"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["Digest"] == digest


def test_pull_as_unprivileged_user_then_run(user_runner: Runner, foreign: str) -> None:
    ref = f"{foreign}:gzip"
    proc = user_runner.run(["pull", ref], timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = user_runner.exec("echo", "rootless pull", image=ref)
    assert result["status"] == "ok" and result["stdout"] == "rootless pull\n"


def test_second_pull_downloads_nothing(cli: Cli, registry: Registry, foreign: str,
                                       proxy: FaultProxy) -> None:
    ref = f"{proxy.host}/foreign/bb:gzip"
    first = cli.ok("pull", ref)
    assert "Downloaded newer image" in first.stdout
    gets = [e for e in proxy.log if "/blobs/" in e["path"]]
    assert len(gets) == 2  # config and layer
    proxy.log.clear()
    second = cli.ok("pull", ref)
    assert "Image is up to date" in second.stdout
    assert not [e for e in proxy.log if "/blobs/" in e["path"]]
    # the same blobs under another name: nothing downloaded either
    third = cli.ok("pull", f"{proxy.host}/foreign/bb:v2s2")
    assert "Already exists" in third.stderr


def test_pull_by_digest(cli: Cli, foreign: str) -> None:
    digest = skopeo_digest(f"{foreign}:gzip")
    ref = f"{foreign}@{digest}"
    proc = cli.ok("pull", ref)
    assert proc.stdout.splitlines()[-1] == ref
    assert cli.inspect(ref)["manifest"] == digest
    bad = "sha256:" + "0" * 64
    err = cli.fails("pull", f"{foreign}@{bad}")
    assert "not found" in err


def test_exec_pulls_on_first_use(cli: Cli, foreign: str) -> None:
    ref = f"{foreign}:gzip"
    assert ref not in cli.images()
    run = cli.ok("exec", "--json", "--image", ref, "echo", "pulled on first use")
    assert json.loads(run.stdout)["stdout"] == "pulled on first use\n"
    assert ref in cli.images()


def test_unknown_name_or_tag_is_one_line(cli: Cli, registry: Registry, foreign: str) -> None:
    err = cli.fails("pull", f"{registry.host}/foreign/bb:no-such-tag")
    assert "not found" in err and "manifest unknown" in err
    err = cli.fails("pull", f"{registry.host}/no/such/repo")
    assert "not found" in err
    err = cli.fails("exec", "--image", f"{registry.host}/no/such/repo", "true")
    assert "pulling it failed" in err
    for bad in ("UPPER/Case", "a b", "x@sha512:abcd", "name:" + "t" * 200):
        assert "invalid image reference" in cli.fails("pull", bad)
    assert not cli.images()


def _push_manifest(registry: Registry, repo: str, ref: str, body: dict[str, object],
                   media_type: str) -> str:
    data = json.dumps(body).encode()
    resp = httpx.put(f"{registry.url}/v2/{repo}/manifests/{ref}", content=data,
                     headers={"Content-Type": media_type})
    assert resp.status_code == 201, resp.text
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(registry: Registry, repo: str, ref: str) -> tuple[bytes, str]:
    resp = httpx.get(f"{registry.url}/v2/{repo}/manifests/{ref}",
                     headers={"Accept": OCI_MANIFEST})
    resp.raise_for_status()
    return resp.content, resp.headers["docker-content-digest"]


def test_index_picks_this_platform(cli: Cli, registry: Registry, foreign: str) -> None:
    data, digest = _manifest(registry, "foreign/bb", "gzip")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "unknown", "architecture": "unknown"}}]}
    index_digest = _push_manifest(registry, "foreign/bb", "multi", index, OCI_INDEX)
    ref = f"{registry.host}/foreign/bb:multi"
    proc = cli.ok("pull", ref)
    assert f"Digest: {index_digest}" in proc.stdout
    assert "linux/amd64" in proc.stderr
    assert cli.inspect(ref)["manifest"] == digest
    run = cli.ok("exec", "--json", "--image", ref, "echo", "from an index")
    assert json.loads(run.stdout)["stdout"] == "from an index\n"


def test_index_without_this_platform_is_refused(cli: Cli, registry: Registry,
                                                foreign: str) -> None:
    data, digest = _manifest(registry, "foreign/bb", "gzip")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data),
         "platform": {"os": "linux", "architecture": "s390x"}}]}
    _push_manifest(registry, "foreign/bb", "armonly", index, OCI_INDEX)
    err = cli.fails("pull", f"{registry.host}/foreign/bb:armonly")
    assert "linux/amd64" in err and "linux/arm64/v8" in err and "linux/s390x" in err
    assert not cli.images()


def test_schema1_is_refused(cli: Cli, foreign: str, proxy: FaultProxy) -> None:
    """Without schema 2 in Accept, the registry converts a Docker schema 2 manifest to
    schema 1: the proxy strips our Accept so the real registry answers with schema 1."""
    def strip_accept(handler, method: str, path: str) -> bool:  # type: ignore[no-untyped-def]
        if "/manifests/" not in path:
            return False
        del handler.headers["Accept"]
        handler.forward(b"")
        return True

    proxy.faults.append(strip_accept)
    err = cli.fails("pull", f"{proxy.host}/foreign/bb:v2s2")
    assert "schema 1" in err
    assert not cli.images()


def test_mirror_is_tried_first_and_a_dead_one_skipped(cli: Cli, registry: Registry,
                                                      foreign: str) -> None:
    from .servers import free_port

    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    cli.write_config(f'retries = 2\nbackoff = 0\n[registries."{origin}"]\n'
                     f'mirrors = ["127.0.0.1:{free_port()}", "http://{registry.host}"]\n')
    ref = f"{origin}/foreign/bb:gzip"
    proc = cli.ok("pull", ref)
    assert proc.stdout.splitlines()[-1] == ref
    assert "trying the next" in proc.stderr
    assert cli.inspect(ref)["manifest"] == skopeo_digest(f"{foreign}:gzip")


def test_tls_is_verified_unless_insecure(cli: Cli, tls_registry: Registry,
                                         local_busybox: str) -> None:
    skopeo_copy(f"oci:{local_busybox}:busybox:latest", f"docker://{tls_registry.host}/bb:1")
    ref = f"{tls_registry.host}/bb:1"
    cli.ok("pull", ref)  # loopback: insecure by default, as in Docker
    cli.write_config(f'[registries."{tls_registry.host}"]\ninsecure = false\n')
    err = cli.fails("pull", ref)
    assert "certificate verification failed" in err and "--insecure" in err
    cli.ok("pull", "--insecure", ref)
    cert = tls_registry.directory / "cert.pem"
    cli.write_config(f'[registries."{tls_registry.host}"]\ninsecure = false\n'
                     f'ca_file = "{cert}"\n')
    cli.ok("pull", ref)


def test_bad_config_is_one_line(cli: Cli, foreign: str) -> None:
    cli.write_config("retries = 'many'\n")
    assert "registries.toml" in cli.fails("pull", f"{foreign}:gzip")
    cli.write_config("[registries.x]\nmirrors = 3\n")
    assert "mirrors" in cli.fails("pull", f"{foreign}:gzip")
