"""Faults of the daemon route, as root and as the unprivileged user: the daemon's spawner
killed mid-job, the daemon itself killed with several jobs running, a cgroup that cannot be
created while it runs. Each: a clear result or one-line error for the jobs hit, no job
survives, nothing leaks, and the daemon (or the next one) carries on. (A registry that
vanishes mid-pull is in tests/registry/test_faults.py, next to the registries.)"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import cgroupfs
from tests.conftest import Daemon, Runner, start_daemon
from tests.security.conftest import processes_with
from tests.security.test_faults import _job_cgroups, _reap, _wait_gone, spawners

pytestmark = pytest.mark.usefixtures("no_leaks")


def own_daemon(runner: Runner, *args: str) -> Daemon:
    """A daemon of ``runner``'s user in a directory of its own (removed by `stop`)."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
    directory.chmod(0o777)
    return start_daemon(directory, *args, user=runner.user, env=daemon_env(runner))


def daemon_env(runner: Runner) -> dict[str, str] | None:
    return runner.env if runner.user else None  # root's daemon: the tests' environment


@pytest.fixture
def daemon(runner: Runner) -> Iterator[Daemon]:
    d = own_daemon(runner, "--pool", "2", "--warm", "busybox")
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    subprocess.run(["rm", "-rf", str(d.path.parent)], check=True)


def daemon_pid(d: Daemon) -> int:
    """The daemon's own pid (under runuser, runuser's child)."""
    if d.user is None:
        return d.proc.pid
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def cli(runner: Runner, d: Daemon, *args: str) -> subprocess.Popen[bytes]:
    env = None if runner.user else {**os.environ, **runner.env, "SANDBOX_SOCKET": str(d.path)}
    return subprocess.Popen(runner.command(["exec", *args], {"SANDBOX_SOCKET": str(d.path)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def start_job(runner: Runner, d: Daemon, token: str, *args: str) -> subprocess.Popen[bytes]:
    """`sandbox exec` of a job that sleeps, through the daemon; returns once it runs (its
    processes carry ``token`` in their environment: give each job its own)."""
    proc = cli(runner, d, *args, "--image", "busybox", "--env", f"SBX_HOSTILE={token}",
               "--wall-time", "120", "sh", "-c", "(sleep 1000 &); sleep 1000")
    deadline = time.monotonic() + 60
    while len(processes_with(token)) < 2 and proc.poll() is None:
        if time.monotonic() > deadline:
            _reap(proc)
            raise AssertionError("the job did not start")
        time.sleep(0.05)
    assert proc.poll() is None, _reap(proc)
    return proc


def one_line_error(err: bytes) -> str:
    text = err.decode(errors="replace").strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


def run_ok(runner: Runner, d: Daemon, n: int = 3) -> None:
    for i in range(n):
        out, err = _reap(cli(runner, d, "--json", "--image", "busybox", "echo", f"ok{i}"))
        assert json.loads(out)["stdout"] == f"ok{i}\n", err


@pytest.mark.cgroups
def test_sigkill_of_the_daemons_spawner_mid_job(runner: Runner, daemon: Daemon) -> None:
    token = f"sbx-fault-{secrets.token_hex(6)}"
    pid = daemon_pid(daemon)
    before = spawners(pid)
    assert len(before) == 1, before
    jobs = [start_job(runner, daemon, f"{token}-1"),
            start_job(runner, daemon, f"{token}-2", "--json")]
    os.kill(before[0], signal.SIGKILL)
    (_, err), (out, _) = _reap(jobs[0]), _reap(jobs[1])
    assert jobs[0].returncode == 125 and "sandbox init died" in one_line_error(err), err
    result = json.loads(out)
    assert (result["status"], jobs[1].returncode) == ("internal_error", 125), result
    assert not _wait_gone(token), "a job survived the spawner"
    run_ok(runner, daemon)  # the daemon carries on with a new spawner
    after = spawners(pid)
    assert len(after) == 1 and after != before, after
    assert daemon.proc.poll() is None


@pytest.mark.cgroups
def test_sigkill_of_the_daemon_with_jobs_running(runner: Runner) -> None:
    """Extends test_daemon.py::test_sigkill_leaves_no_job_and_restart_cleans_up to several
    jobs, a warm pool and the unprivileged user."""
    token = f"sbx-fault-{secrets.token_hex(6)}"
    d = own_daemon(runner, "--pool", "2", "--warm", "busybox", "--max-running", "4")
    jobs: list[subprocess.Popen[bytes]] = []
    try:
        pid = daemon_pid(d)
        jobs += [start_job(runner, d, f"{token}-{i}") for i in range(3)]
        assert len(_job_cgroups(runner.name, pid)) >= 3
        os.kill(pid, signal.SIGKILL)
        for proc in jobs:
            _, err = _reap(proc)
            assert proc.returncode == 125, err
            assert "daemon" in one_line_error(err), err
        assert not _wait_gone(token), "a job outlived its daemon"
        if cgroupfs.V2:  # systemd removes the dead spawner's scope, job cgroups and all
            assert cgroupfs.wait_until(lambda: not _job_cgroups(runner.name, pid)), \
                _job_cgroups(runner.name, pid)
        else:
            assert _job_cgroups(runner.name, pid), "nothing to clean up: the test proves nothing"
        d.proc.wait(timeout=30)
        d2 = start_daemon(d.path.parent, "--pool", "0", user=runner.user, env=daemon_env(runner))
        try:
            run_ok(runner, d2, 1)
            assert not _job_cgroups(runner.name, pid), "the next daemon removes stale cgroups"
        finally:
            assert d2.stop() == 0
    finally:
        for proc in jobs:
            _reap(proc)
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(d.path.parent)], check=True)


def test_cgroup_that_cannot_be_created_while_the_daemon_runs(user_runner: Runner) -> None:
    """The user's cgroup subtree becomes unwritable under a running daemon (root can always
    write, so this is the unprivileged user's daemon): the job gets one clean error, and
    the daemon carries on once the subtree is writable again."""
    cgroupfs.v1_only()  # on v2 the subtree is a fresh systemd scope for each spawner
    d = own_daemon(user_runner, "--pool", "0")
    subtree = cgroupfs.HIERARCHIES["memory"] / "sandbox" / user_runner.name
    mode = subtree.stat().st_mode & 0o7777
    try:
        run_ok(user_runner, d, 1)
        subtree.chmod(0o555)
        try:
            out, err = _reap(cli(user_runner, d, "--image", "busybox", "true"))
            assert "cgroup" in one_line_error(err), err
            out, err = _reap(cli(user_runner, d, "--json", "--image", "busybox", "true"))
            result = json.loads(out)
            assert result["status"] == "internal_error" and "cgroup" in result["message"]
        finally:
            subtree.chmod(mode)
        run_ok(user_runner, d)
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
        subprocess.run(["rm", "-rf", str(d.path.parent)], check=True)

