"""`sandbox push` to a real registry; skopeo and podman pull the result and run it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Runner, need

from .conftest import Cli, skopeo_digest
from .servers import FaultProxy, Registry, fail_times


@pytest.fixture
def root_cli(cli: Cli, root_runner: Runner) -> Cli:
    """`cli` over root's store, which holds the shipped busybox image."""
    home = os.environ.get("SANDBOX_HOME") or str(Path.home() / ".local/share/sandbox")
    return Cli(Path(home), cli.config, {**cli.env, "SANDBOX_HOME": home})


def _blob_writes(proxy: FaultProxy) -> list[dict[str, object]]:
    return [e for e in proxy.log if "/blobs/uploads/" in str(e["path"])]


def _podman(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["podman", "--root", str(tmp / "root"), "--runroot", str(tmp / "runroot"),
            "--tmpdir", str(tmp / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture
def podman_dir() -> Iterator[Path]:
    """Private podman storage; the cgroup parent it creates is removed afterwards."""
    need(shutil.which("podman") is not None and shutil.which("runc") is not None,
         "podman and runc are needed for the interop test")
    tmp = Path(tempfile.mkdtemp(prefix="sandbox-podman-"))
    yield tmp
    _podman(tmp, "system", "reset", "--force")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in glob.glob(f"/sys/fs/cgroup/*/{tmp.name}"):  # created by podman for us
        for child in sorted(glob.glob(f"{path}/*/"), reverse=True):
            os.rmdir(child)
        os.rmdir(path)


def test_push_then_skopeo_and_podman_pull_and_run(root_cli: Cli, registry: Registry,
                                                  podman_dir: Path) -> None:
    local = root_cli.inspect("busybox")
    ref = f"{registry.host}/pushed/busybox:1"
    proc = root_cli.ok("push", "busybox", ref)
    digest = proc.stdout.strip()
    assert digest == local["manifest"]  # the store's manifest, byte for byte
    again = json.loads(root_cli.ok("push", "--json", "busybox", ref).stdout)
    assert (again["ref"], again["digest"], again["uploaded"]) == (ref, digest, 0), again
    assert skopeo_digest(ref) == digest
    pulled = _podman(podman_dir, "pull", "--tls-verify=false", ref)
    assert pulled.returncode == 0, pulled.stderr
    info = _podman(podman_dir, "image", "inspect", "--format", "{{.Digest}}", ref)
    assert info.stdout.strip() == digest
    # podman's default rlimits exceed what this host allows; conmon stays out of cgroups
    run = _podman(podman_dir, "run", "--rm", "--runtime", "runc", "--network", "none",
                  "--cgroups", "no-conmon", "--cgroup-parent", f"/{podman_dir.name}",
                  "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                  ref, "sh", "-c", "echo hello from podman")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello from podman\n"


def test_repush_uploads_nothing(root_cli: Cli, registry: Registry, proxy: FaultProxy) -> None:
    ref = f"{proxy.host}/pushed/again:1"
    first = root_cli.ok("push", "busybox", ref)
    assert _blob_writes(proxy) or "Mounted from" in first.stderr
    proxy.log.clear()
    second = root_cli.ok("push", "busybox", ref)
    assert second.stdout == first.stdout
    assert not _blob_writes(proxy)
    assert {e["method"] for e in proxy.log} <= {"GET", "HEAD", "PUT"}
    puts = [e["path"] for e in proxy.log if e["method"] == "PUT"]
    assert puts == ["/v2/pushed/again/manifests/1"]
    assert "0 uploaded, 0 mounted, 3 already there" in second.stderr


def test_chunked_upload_with_relative_locations(root_cli: Cli, registry: Registry,
                                                proxy: FaultProxy, cli: Cli) -> None:
    root_cli.write_config('chunk_size = "256K"\n')

    def relative(handler, method: str, path: str) -> bool:  # type: ignore[no-untyped-def]
        if "/blobs/uploads/" not in path:
            return False
        handler.forward(handler.body, headers=lambda k, v: v.split(proxy.host, 1)[-1]
                        if k.lower() == "location" else v)
        return True

    proxy.faults.append(relative)
    ref = f"{proxy.host}/chunked/bb:1"
    digest = root_cli.ok("push", "busybox", ref).stdout.strip()
    patches = [e for e in proxy.log if e["method"] == "PATCH"]
    assert len(patches) > 2 and all(int(str(e["size"])) <= 256 * 1024 for e in patches)
    assert skopeo_digest(f"{registry.host}/chunked/bb:1") == digest
    cli.ok("pull", f"{registry.host}/chunked/bb:1")  # and back, verified
    run = cli.ok("exec", "--json", "--image", f"{registry.host}/chunked/bb:1", "echo", "ok")
    assert json.loads(run.stdout)["stdout"] == "ok\n"


def test_cross_repository_mount(root_cli: Cli, registry: Registry, proxy: FaultProxy) -> None:
    root_cli.ok("push", "busybox", f"{proxy.host}/mount/one:1")
    proxy.log.clear()
    proc = root_cli.ok("push", "busybox", f"{proxy.host}/mount/two:1")
    assert "3 mounted" in proc.stderr
    mounts = [e for e in proxy.log if e["method"] == "POST"]
    assert mounts and all("mount=sha256" in str(e["path"]) and "from=mount%2Fone"
                          in str(e["path"]) for e in mounts)
    assert not [e for e in proxy.log if e["method"] in ("PATCH", "PUT")
                and "/blobs/" in str(e["path"])]


def test_failed_upload_is_retried(root_cli: Cli, registry: Registry, proxy: FaultProxy) -> None:
    root_cli.write_config("backoff = 0.05\n")
    proxy.faults.append(fail_times(2, 500, match="/blobs/uploads/"))
    digest = root_cli.ok("push", "busybox", f"{proxy.host}/retried/bb:1").stdout.strip()
    assert skopeo_digest(f"{registry.host}/retried/bb:1") == digest


def test_push_errors_are_one_line(root_cli: Cli, registry: Registry) -> None:
    assert "not found" in root_cli.fails("push", "no-such-image", f"{registry.host}/x:1")
    wrong = "sha256:" + "1" * 64
    assert "push it by tag" in root_cli.fails("push", "busybox", f"{registry.host}/x@{wrong}")
    assert "invalid image reference" in root_cli.fails("push", "busybox", "Bad Name")
