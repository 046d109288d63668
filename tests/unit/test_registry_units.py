"""Pure parts of the registry support: references, config, credentials files, challenges,
manifest types, platform choice, and how local and registry names share the store."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sandbox.errors import ImageError, RegistryError
from sandbox.images import auth, reference, registry_config
from sandbox.images.pull import choose_platform
from sandbox.images.registry import (
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    manifest_media_type,
)
from sandbox.images.store import Store

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("python", "docker.io/library/python:latest"),
    ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
    ("me/app", "docker.io/me/app:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    (f"python@{DIGEST}", f"docker.io/library/python@{DIGEST}"),
    (f"python:3@{DIGEST}", f"docker.io/library/python:3@{DIGEST}"),
    ("127.0.0.1:5000/team/app:v1_2", "127.0.0.1:5000/team/app:v1_2"),
    ("localhost/app", "localhost/app:latest"),
    ("ghcr.io/o/r/deep/name:Tag", "ghcr.io/o/r/deep/name:Tag"),
    ("[::1]:5000/x", "[::1]:5000/x:latest"),
])
def test_references_normalise_like_docker(text: str, expected: str) -> None:
    assert str(reference.parse(text)) == expected


def test_reference_parts() -> None:
    ref = reference.parse("python:3")
    assert (ref.registry, ref.api_host, ref.repository, ref.reference) == (
        "docker.io", "registry-1.docker.io", "library/python", "3")
    by_digest = reference.parse(f"python:3@{DIGEST}")
    assert by_digest.reference == DIGEST
    assert by_digest.store_name == f"docker.io/library/python@{DIGEST}"


@pytest.mark.parametrize("text", ["", "UPPER", "a b", "x@sha512:00", f"x@sha256:{'z' * 64}",
                                  "x:" + "t" * 129, "x/-y", "x//y", "a:b:c", "x:-tag"])
def test_invalid_references(text: str) -> None:
    with pytest.raises(ImageError, match="invalid image reference"):
        reference.parse(text)


def test_loopback_and_qualified_names() -> None:
    assert reference.is_loopback("127.0.0.1:5000")
    assert reference.is_loopback("127.9.9.9")
    assert reference.is_loopback("[::1]:5000")
    assert reference.is_loopback("localhost:1")
    assert not reference.is_loopback("registry.example.com")
    assert not reference.is_loopback("10.0.0.1:5000")
    assert reference.is_qualified("localhost/x") and reference.is_qualified("a.b/x")
    assert not reference.is_qualified("py3") and not reference.is_qualified("me/app")
    assert reference.parse_registry("https://index.docker.io/v1/") == "docker.io"
    assert reference.parse_registry("127.0.0.1:5000") == "127.0.0.1:5000"


def test_registries_config(tmp_path: Path) -> None:
    path = tmp_path / "registries.toml"
    assert registry_config.load(path).retries == 5  # absent: defaults
    path.write_text('concurrent_downloads = 2\nchunk_size = "1M"\n'
                    '[registries."docker.io"]\nmirrors = ["https://m.example", "127.0.0.1:9"]\n'
                    '[registries."127.0.0.1:5000"]\ninsecure = false\n')
    cfg = registry_config.load(path)
    assert (cfg.concurrent_downloads, cfg.chunk_size) == (2, 1 << 20)
    endpoints = cfg.pull_endpoints("docker.io")
    assert [(e.host, e.scheme, e.insecure, e.mirror) for e in endpoints] == [
        ("m.example", "https", False, True), ("127.0.0.1:9", None, True, True),
        ("registry-1.docker.io", None, False, False)]
    assert not cfg.endpoint("127.0.0.1:5000").insecure  # said so explicitly
    assert cfg.endpoint("127.0.0.1:5000", insecure=True).insecure
    assert cfg.endpoint("127.0.0.1:6000").insecure  # loopback default
    assert not cfg.endpoint("ghcr.io").insecure
    for bad in ("nope = 1", "retries = 0", "[registries.x]\ninsecure = 'yes'",
                "[registries.x]\nmirrors = ['bad host']", "chunk_size = 'lots'", "x = ["):
        path.write_text(bad)
        with pytest.raises(ImageError, match=r"registries\.toml"):
            registry_config.load(path)


def test_credentials_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_AUTH_FILE", str(tmp_path / "auth.toml"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    assert auth.find_credentials("r.example") is None
    odd = 'p"a\\ss\tword\x7f'
    auth.save_credentials("r.example", "bob", odd)
    creds = auth.find_credentials("r.example")
    assert creds is not None and (creds.username, creds.password) == ("bob", odd)
    assert odd not in repr(creds)
    assert (tmp_path / "auth.toml").stat().st_mode & 0o077 == 0
    assert auth.remove_credentials("r.example") and not auth.remove_credentials("r.example")
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {
        auth.DOCKER_HUB_KEY: {"auth": base64.b64encode(b"hub:pw").decode()},
        "quay.io": {"username": "q", "password": "qq"}}}))
    hub = auth.find_credentials("docker.io")
    assert hub is not None and (hub.username, hub.password) == ("hub", "pw")
    quay = auth.find_credentials("quay.io")
    assert quay is not None and quay.source.endswith("config.json")
    assert quay.basic() == "Basic " + base64.b64encode(b"q:qq").decode()


def test_challenges() -> None:
    c = auth.parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                             'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}
    basic = auth.parse_challenge('Basic realm="x y"')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == "x y"


def test_manifest_media_types() -> None:
    oci = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST}).encode()
    assert manifest_media_type(oci, MT_OCI_MANIFEST, "x") == MT_OCI_MANIFEST
    assert manifest_media_type(oci, "application/json", "x") == MT_OCI_MANIFEST
    bare_index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert manifest_media_type(bare_index, "", "x") == MT_OCI_INDEX
    with pytest.raises(RegistryError, match="served as"):
        manifest_media_type(oci, MT_DOCKER_MANIFEST, "x")
    schema1 = json.dumps({"schemaVersion": 1, "fsLayers": []}).encode()
    with pytest.raises(RegistryError, match="schema 1"):
        manifest_media_type(schema1, "application/json", "x")
    with pytest.raises(RegistryError, match="unsupported manifest type"):
        manifest_media_type(b"{}", "text/html", "x")
    with pytest.raises(RegistryError, match="not JSON"):
        manifest_media_type(b"<html>", MT_OCI_MANIFEST, "x")


def test_platform_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.images import pull

    def entry(arch: str, variant: str | None = None) -> dict[str, object]:
        platform = {"os": "linux", "architecture": arch}
        if variant:
            platform["variant"] = variant
        return {"digest": DIGEST, "size": 1, "platform": platform}

    index = {"manifests": [entry("arm64", "v8"), entry("amd64"), entry("arm", "v7")]}
    monkeypatch.setattr(pull, "host_platform", lambda: ("linux", "amd64", ""))
    assert choose_platform(index, "x")["platform"]["architecture"] == "amd64"
    monkeypatch.setattr(pull, "host_platform", lambda: ("linux", "arm64", "v8"))
    assert choose_platform(index, "x")["platform"]["variant"] == "v8"
    monkeypatch.setattr(pull, "host_platform", lambda: ("linux", "s390x", ""))
    with pytest.raises(RegistryError, match=r"linux/s390x .*linux/amd64, linux/arm/v7"):
        choose_platform(index, "x")


def _tag(store: Store, name: str, label: str) -> str:
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}, "label": label}).encode()
    cfg_digest = store.put_blob(cfg)
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": cfg_digest,
                                                          "size": len(cfg)},
                           "layers": []}).encode()
    digest = store.put_blob(manifest)
    store.set_ref(name, digest, len(manifest))
    return digest


def test_local_names_win_over_registry_names(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.init()
    pulled = _tag(store, "docker.io/library/tool:latest", "pulled")
    found = store.find("tool")
    assert found is not None and found.manifest_digest == pulled
    local = _tag(store, "tool", "local")
    found = store.find("tool")
    assert found is not None and found.manifest_digest == local
    found = store.find("docker.io/library/tool")
    assert found is not None and found.manifest_digest == pulled
    assert store.remove("tool") == "tool:latest"
    assert store.remove("tool") == "docker.io/library/tool:latest"
    assert store.find("tool") is None


def test_proxy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.images.registry import env_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("ghcr.io") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "quay.io")
    assert env_proxy("ghcr.io") == "http://proxy.example:3128"
    assert env_proxy("quay.io") is None
    assert env_proxy("127.0.0.1:5000") is None
