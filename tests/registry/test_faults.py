"""A registry that misbehaves (through a fault-injecting proxy in front of a real one)."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from tests.conftest import SANDBOX, start_daemon

from .conftest import Cli
from .servers import (
    Fault,
    FaultProxy,
    Registry,
    _ProxyHandler,
    corrupt_blobs,
    drop_blob_once,
    fail_times,
    free_port,
    is_blob_get,
    wait_for,
)


def _layer(cli: Cli, proxy: FaultProxy, tag: str = "gzip") -> tuple[str, int]:
    """(digest, size) of the image's only layer, asked of the registry directly."""
    import httpx

    resp = httpx.get(f"http://127.0.0.1:{proxy.upstream_port}/v2/foreign/bb/manifests/{tag}",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    layer = resp.json()["layers"][0]
    return layer["digest"], layer["size"]


def _assert_store_clean(cli: Cli) -> None:
    """No image, no unverified blob, nothing staged."""
    assert not cli.images()
    for name, data in cli.store_blobs().items():
        assert hashlib.sha256(data).hexdigest() == name
    tmp = cli.home / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())


def test_broken_connection_mid_blob_is_resumed_with_range(cli: Cli, foreign: str,
                                                          proxy: FaultProxy) -> None:
    digest, size = _layer(cli, proxy)
    proxy.faults.append(drop_blob_once(digest, fraction=0.5))
    ref = f"{proxy.host}/foreign/bb:gzip"
    proc = cli.ok("pull", ref)
    assert "resuming" in proc.stderr
    gets = [e for e in proxy.log if e["path"].endswith(digest)]
    assert len(gets) == 2
    start = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= size // 2  # resumed from what had arrived, not restarted
    run = cli.ok("exec", "--json", "--image", ref, "echo", "resumed")
    assert json.loads(run.stdout)["stdout"] == "resumed\n"


def test_wrong_digest_is_refused_and_nothing_stored(cli: Cli, foreign: str,
                                                    proxy: FaultProxy) -> None:
    digest, _ = _layer(cli, proxy)
    proxy.faults.append(corrupt_blobs(digest))
    err = cli.fails("pull", f"{proxy.host}/foreign/bb:gzip")
    assert "does not match its digest" in err and digest in err
    _assert_store_clean(cli)
    assert digest.removeprefix("sha256:") not in cli.store_blobs()


def test_corrupt_config_is_refused(cli: Cli, foreign: str, proxy: FaultProxy) -> None:
    proxy.faults.append(corrupt_blobs())  # the config is the first blob fetched
    assert "does not match its digest" in cli.fails("pull", f"{proxy.host}/foreign/bb:gzip")
    _assert_store_clean(cli)


def test_500_then_200_is_retried(cli: Cli, foreign: str, proxy: FaultProxy) -> None:
    cli.write_config("backoff = 0.05\n")
    proxy.faults.append(fail_times(2, 500, match="/manifests/"))
    proxy.faults.append(fail_times(1, 503, match="/blobs/"))
    proxy.faults.append(fail_times(1, 429, match="/blobs/"))
    ref = f"{proxy.host}/foreign/bb:gzip"
    cli.ok("pull", ref)
    statuses = [e["path"] for e in proxy.log if "/manifests/" in e["path"]]
    assert len(statuses) == 3  # two refused, the third served
    assert ref in cli.images()


def test_gives_up_after_the_configured_retries(cli: Cli, foreign: str,
                                               proxy: FaultProxy) -> None:
    cli.write_config("retries = 3\nbackoff = 0\n")
    proxy.faults.append(fail_times(100, 503, match="/manifests/"))
    err = cli.fails("pull", f"{proxy.host}/foreign/bb:gzip")
    assert "503" in err and "gave up after 3 attempts" in err
    assert len([e for e in proxy.log if "/manifests/" in e["path"]]) == 3
    _assert_store_clean(cli)


def test_unreachable_registry_is_one_line(cli: Cli) -> None:
    cli.write_config("retries = 2\nbackoff = 0\n")
    err = cli.fails("pull", f"127.0.0.1:{free_port()}/x:1")
    assert "cannot reach" in err
    _assert_store_clean(cli)


def test_disk_full_is_one_line_and_leaves_no_image(cli: Cli, foreign: str) -> None:
    """The store on a 600 KiB tmpfs (in a private mount namespace): the layer does not fit."""
    ref = f"{foreign}:gzip"
    script = (f"mkdir -p {cli.home} && mount -t tmpfs -o size=600k tmpfs {cli.home} && "
              f"{SANDBOX} pull {shlex.quote(ref)}; echo rc=$?; ls {cli.home}/tmp; "
              f"{SANDBOX} images --json")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, env=cli.env, timeout=120,
                          check=False)
    err = [line for line in proc.stderr.splitlines() if line.startswith("sandbox: error")]
    assert len(err) == 1 and "disk full" in err[0], proc.stderr
    assert "rc=125" in proc.stdout
    assert proc.stdout.strip().endswith("[]")  # no image; tmp/ listed empty


def test_forbidden_is_one_line_and_not_retried(cli: Cli, foreign: str,
                                               proxy: FaultProxy) -> None:
    proxy.faults.append(fail_times(100, 403, match="/manifests/"))
    err = cli.fails("pull", f"{proxy.host}/foreign/bb:gzip")
    assert "access denied" in err
    assert len([e for e in proxy.log if "/manifests/" in e["path"]]) == 1


def test_blob_longer_than_declared_is_cut_off(cli: Cli, foreign: str,
                                              proxy: FaultProxy) -> None:
    digest, size = _layer(cli, proxy)

    def longer(handler, method: str, path: str) -> bool:  # type: ignore[no-untyped-def]
        if method != "GET" or not path.endswith(digest):
            return False
        handler.forward(b"", transform=lambda d: d + b"\0" * 4096)
        return True

    proxy.faults.append(longer)
    err = cli.fails("pull", f"{proxy.host}/foreign/bb:gzip")
    assert f"more than the {size} bytes" in err
    _assert_store_clean(cli)


def _vanish_mid_blob(proxy: FaultProxy) -> Fault:
    """Send half of the first blob asked for, then stop the proxy: the registry is gone
    (connections refused) for the rest of the pull."""
    def fault(handler: _ProxyHandler, method: str, path: str) -> bool:
        if not is_blob_get(method, path):
            return False
        size = len(handler.upstream(b"")[3])
        threading.Thread(target=proxy.stop, daemon=True).start()
        handler.forward(b"", cut_at=max(1, size // 2))
        return True

    return fault


def _stopped(proxy: FaultProxy) -> Callable[[], bool]:
    """For `wait_for`: whether ``proxy`` has stopped serving."""
    return lambda: not proxy.thread.is_alive()


def test_registry_that_vanishes_mid_pull_with_a_daemon(cli: Cli, foreign: str,
                                                       registry: Registry,
                                                       no_leaks: None) -> None:
    """`sandbox pull` next to a daemon on the same store, and `sandbox exec` pulling on
    first use through the daemon: the registry disappears mid-blob; each gets a one-line
    error, no image and nothing partial is stored, and the daemon carries on."""
    cli.write_config("retries = 2\nbackoff = 0.1\ntimeout = 10\n")
    directory = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
    daemon = start_daemon(directory, "--pool", "0", env=cli.env)
    route = {"SANDBOX_SOCKET": str(daemon.path)}
    try:
        for args in (["pull"], ["exec", "--image"]):
            proxy = FaultProxy(registry)
            proxy.faults.append(_vanish_mid_blob(proxy))
            err = cli.fails(*args, f"{proxy.host}/foreign/bb:gzip",
                            *(["echo", "never"] if args[0] == "exec" else []), extra_env=route)
            assert wait_for(_stopped(proxy))  # it did vanish
            assert "Connection refused" in err, err  # the retry found it gone
            _assert_store_clean(cli)
        # the daemon carries on: the same image, from the registry itself this time
        run = cli.ok("exec", "--json", "--image", f"{foreign}:gzip", "echo", "carried on",
                     extra_env=route)
        assert json.loads(run.stdout)["stdout"] == "carried on\n"
        assert "job_done" in daemon.log.read_text()  # it went through the daemon
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
        shutil.rmtree(directory, ignore_errors=True)
