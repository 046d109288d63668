"""Faults of the embedded route: the CLI or the spawner killed mid-job, a full disk under the
job's output and under an unpack, a stalled reader, a cgroup that cannot be created, an
image layer deleted under a running job. Each: a clear result or one-line error, no job
survives, nothing leaks, and the next run works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import cgroupfs
from tests.conftest import REPO, Runner
from tests.security.conftest import Hostile, processes_with

# These faults are about the embedded supervisor (the CLI owns the spawner and the cgroups);
# the daemon's own (SIGKILL, SIGTERM, disconnects) are in tests/integration/test_daemon.py
# and test_daemon_faults.py.
EMBEDDED = pytest.mark.parametrize("via", [("exec", {})], ids=["exec"])


def _wait_gone(token: str, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def spawners(pid: int) -> list[int]:
    """The daemon's spawner children (processes that exit while we look are skipped)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # a worker thread that ended
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"sandbox._spawner" in cmdline:
                found.append(int(child))
    return found


def _job_cgroups(user: str, supervisor: int) -> list[Path]:
    """The supervisor's job cgroups; on cgroup v2 also the systemd scope(s) of its
    spawner, which systemd removes once the last process in them is gone."""
    return [*cgroupfs.job_cgroups(user, supervisor), *cgroupfs.supervisor_scopes(supervisor)]


def _start(hostile: Hostile, script: str, *opts: str) -> subprocess.Popen[bytes]:
    """Start `sandbox exec` of ``script``; returns once the job printed ``up``."""
    proc = subprocess.Popen(
        hostile.command(["exec", "--image", "busybox", "--env", f"SBX_HOSTILE={hostile.token}",
                         *opts, "sh", "-c", f"echo up; {script}"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hostile.popen_env())
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    return proc


def _supervisor_pid(proc: subprocess.Popen[bytes]) -> int:
    """The CLI's own pid (for the unprivileged user it runs under runuser and env)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # a process that ended while we looked
            continue
        if b"exec" in cmdline.split(b"\0") and b"runuser" not in cmdline:
            return pid
    raise AssertionError("the CLI process was not found")


def _reap(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Wait for a CLI we started (killing it, by its pid, if a check failed first)."""
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.cgroups
@EMBEDDED
def test_sigkill_of_the_cli_mid_job(hostile: Hostile) -> None:
    proc = _start(hostile, "(sleep 1000 &); trap '' TERM HUP; sleep 1000", "--wall-time", "60")
    try:
        cli = _supervisor_pid(proc)
        assert _job_cgroups(hostile.user, cli), "the job's cgroup was not found"
        os.kill(cli, signal.SIGKILL)
    finally:
        _reap(proc)
    assert not _wait_gone(hostile.token), "a job survived its supervisor"
    # the next start removes the cgroups the killed supervisor left (on cgroup v2, systemd
    # removes its spawner's scope with them once the last process in it is gone)
    r = hostile.exec("true")
    assert r["status"] == "ok", r
    assert cgroupfs.wait_until(lambda: not _job_cgroups(hostile.user, cli)), \
        _job_cgroups(hostile.user, cli)


@pytest.mark.cgroups
@EMBEDDED
def test_sigkill_of_the_spawner_mid_job(hostile: Hostile) -> None:
    proc = _start(hostile, "sleep 1000", "--wall-time", "60")
    try:
        cli = _supervisor_pid(proc)
        found = spawners(cli)
        assert len(found) == 1, found
        os.kill(found[0], signal.SIGKILL)
    finally:
        out, err = _reap(proc)
    assert not _wait_gone(hostile.token), "a job survived its spawner"
    assert proc.returncode == 125, (out, err)
    assert len(err.decode().strip().splitlines()) == 1 and b"Traceback" not in err, err
    assert cgroupfs.wait_until(lambda: not _job_cgroups(hostile.user, cli)), \
        _job_cgroups(hostile.user, cli)


@pytest.mark.parametrize("as_json", [False, True], ids=["passthrough", "json"])
def test_job_output_to_a_full_disk(hostile: Hostile, as_json: bool) -> None:
    args = ["exec", *(["--json"] if as_json else []), "--image", "busybox", "--wall-time", "2",
            "--env", f"SBX_HOSTILE={hostile.token}", "sh", "-c", "echo x; sleep 1000 &"
            " head -c 100000 /dev/zero; sleep 1000"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(hostile.command(args), stdout=full, stderr=subprocess.PIPE,
                              env=hostile.popen_env(), timeout=60, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err, err


def test_a_stalled_reader_does_not_stop_the_time_limits(hostile: Hostile) -> None:
    """Nobody reads the CLI's output: the job's wall and CPU limits must still end it. (The
    embedded CLI stalls the job's output; a daemon keeps it for the CLI and lets the job go
    on: either way the job ends at its wall-time limit.)"""
    proc = subprocess.Popen(
        hostile.command(["exec", "--image", "busybox", "--env", f"SBX_HOSTILE={hostile.token}",
                         "--wall-time", "1", "sh", "-c",
                         "(while :; do :; done) & head -c 4000000 /dev/zero; sleep 1000"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hostile.popen_env())
    try:
        deadline = time.monotonic() + 30
        while not processes_with(hostile.token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(hostile.token), "the job did not start"
        assert _wait_gone(hostile.token, timeout=30) == [], "the job outlived its limits"
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 137, err
    assert len(out) <= 4000000


@pytest.mark.cgroups
def test_cgroup_that_cannot_be_created(user_runner: Runner, no_leaks: None) -> None:
    """As the unprivileged user, SANDBOX_CGROUP names a subtree it cannot write."""
    for where in ("sandbox/root", "sandbox/no-such-subtree"):
        env = {"SANDBOX_CGROUP": where}
        proc = user_runner.run(["exec", "--image", "busybox", "true"], extra_env=env)
        err = proc.stderr.decode()
        assert proc.returncode == 125 and len(err.strip().splitlines()) == 1, (where, err)
        assert "cgroup" in err and "Traceback" not in err
        proc = user_runner.run(["exec", "--json", "--image", "busybox", "true"], extra_env=env)
        assert proc.returncode == 125
        assert json.loads(proc.stdout)["status"] == "internal_error"


def test_image_layer_deleted_under_a_running_job(hostile: Hostile, shared_tmp: Path) -> None:
    ctx = shared_tmp / "ctx"
    ctx.mkdir(mode=0o755)
    (ctx / "added").write_text(f"{hostile.token}\n")
    (ctx / "Sandboxfile").write_text("FROM busybox\nCOPY added /added\n")
    for p in ctx.iterdir():
        p.chmod(0o644)
    tag = f"layer-del-{hostile.token[-6:]}"
    assert hostile.runner.run(["build", "-t", tag, str(ctx)], timeout=300).returncode == 0
    try:
        inspect = json.loads(hostile.runner.run(["image", "inspect", tag], check=True).stdout)
        store = hostile.runner.store()
        layer = store / "layers" / inspect["layers"][-1]["diff_id"].split(":")[1]
        assert layer.is_dir(), layer
        proc = subprocess.Popen(
            hostile.command(["exec", "--json", "--image", tag, "--env",
                             f"SBX_HOSTILE={hostile.token}", "sh", "-c",
                             "cat /added; sleep 1; cat /added; ls /; echo end"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hostile.popen_env())
        time.sleep(0.5)  # the job is running (or about to): delete its top layer
        subprocess.run(["rm", "-rf", str(layer)], check=True)
        out, _ = proc.communicate(timeout=60)
        result = json.loads(out)  # a result, whatever the job saw
        assert result["status"] in ("ok", "nonzero_exit", "internal_error"), result
        assert not _wait_gone(hostile.token)
        # the next job on that image unpacks the layer again
        again = hostile.exec("cat", "/added", image=tag)
        assert again["stdout"] == f"{hostile.token}\n", again
    finally:
        hostile.runner.run(["image", "rm", tag])


_UNPACK_ON_FULL_DISK = """
import io, os, sys, tarfile
from pathlib import Path
from sandbox.errors import ImageError
from sandbox.images.store import Store
store = Store(Path(sys.argv[1]))
data = io.BytesIO()
with tarfile.open(fileobj=data, mode="w") as tar:
    for i in range(8):
        info = tarfile.TarInfo(f"f{i}")
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(os.urandom(1 << 20)))
blob = data.getvalue()
os.makedirs(sys.argv[2], exist_ok=True)
digest = "sha256:" + __import__("hashlib").sha256(blob).hexdigest()
# the blob lives elsewhere (it fits); only the unpack hits the full disk
blobs = store.root / "blobs" / "sha256"
blobs.mkdir(parents=True)
os.symlink(os.path.join(sys.argv[2], "blob"), blobs / digest.split(":")[1])
Path(sys.argv[2], "blob").write_bytes(blob)
try:
    store.unpack_layer(digest, digest)
except ImageError as e:
    print("error:", e)
leftovers = sorted(os.listdir(store.root / "tmp")) + sorted(os.listdir(store.root / "layers"))
print("leftovers:", leftovers)
"""


def test_full_disk_during_unpack(tmp_path: Path, no_leaks: None) -> None:
    """The store on a 2 MB tmpfs (mounted in a private mount namespace of a subprocess): an
    8 MB layer cannot be unpacked; a clear ImageError, and no partial layer or staging dir
    is left in the store."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {mnt} && exec {sys.executable} -c "
              f"'{_UNPACK_ON_FULL_DISK}' {mnt}/store {tmp_path}/blobs")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "error: cannot unpack layer: No space left on device" in proc.stdout, proc.stdout
    assert "leftovers: []" in proc.stdout, proc.stdout
