"""The cgroup v2 backend on a pure cgroup v2 host run by systemd, for real.

These run in the guest of ./scripts/test-cgroup2-vm.sh (Debian 12: systemd 252, pure v2),
as root and as unprivileged users, from plain login sessions (ssh) and from a user with no
session at all (the test user, kept alive by `loginctl enable-linger`); on this project's
hybrid v1 CI host they skip, saying so. What they hold the backend to (see
sandbox/cgroups/v2.py for the layout):

* from a login shell, a job's cgroup is in a transient scope of the supervisor's own,
  delegated, with the spawner in its leaf and the jobs beside it; the caller's own process
  is never moved; the scope is gone with the supervisor;
* in a cgroup delegated to us that other processes share (a shell in a systemd-run scope, a
  container's cgroup named by SANDBOX_CGROUP), they move into the leaf, jobs go beside it;
* limits (memory.max, memory.swap.max, pids.max) are what the job asked for, cgroup.kill
  empties a busy cgroup; several supervisors at once; a daemon started on demand is a
  delegated systemd unit; doctor's fix is what works; errors leave nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import client as client_module
from sandbox.cgroups import v2
from sandbox.client import Client
from sandbox.spec import JobSpec, Limits
from tests import cgroupfs
from tests.conftest import SANDBOX, TEST_USER, Runner, exec_result
from tests.security.test_faults import _supervisor_pid, spawners

pytestmark = pytest.mark.cgroups


@pytest.fixture(autouse=True)
def _pure_v2() -> None:
    cgroupfs.v2_only()
    if not cgroupfs.SYSTEMD:
        pytest.skip("a pure cgroup v2 host run by systemd (the guest of "
                    "./scripts/test-cgroup2-vm.sh)")


def _uid(runner: Runner) -> int:
    return cgroupfs.uid_of(runner.user)


def _shell(runner: Runner, script: str, *, env: dict[str, str] | None = None,
           timeout: float = 300, stdin: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """``sh -c script`` as the runner's user, with its environment (and the user manager's
    runtime dir, which `runuser` does not set)."""
    extra = {"XDG_RUNTIME_DIR": f"/run/user/{_uid(runner)}", **(env or {})}
    if runner.user is None:
        return subprocess.run(["sh", "-c", script], env={**os.environ, **runner.env, **extra},
                              capture_output=True, timeout=timeout, check=False)
    pairs = [f"{k}={v}" for k, v in {**runner.env, **extra}.items()]
    return subprocess.run(["runuser", "-u", runner.user, "--", "env", "-i", *pairs, "sh", "-c",
                           script], capture_output=True, timeout=timeout, check=False)


def _systemctl(runner: Runner, *args: str) -> str:
    user = "" if _uid(runner) == 0 else "--user"
    proc = _shell(runner, f"systemctl {user} {' '.join(args)}")
    return proc.stdout.decode().strip()


def _show(runner: Runner, unit: str, *props: str) -> dict[str, str]:
    out = _systemctl(runner, "show", unit, *(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _no_stale_cgroups() -> None:
    assert cgroupfs.wait_until(lambda: not cgroupfs.stale_cgroups()), cgroupfs.stale_cgroups()


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_a_job_runs_in_a_delegated_scope_of_the_supervisors(runner: Runner) -> None:
    proc = subprocess.Popen(
        runner.command(["exec", "--image", "busybox", "--memory", "64M", "--pids", "20", "sh",
                        "-c", "echo up; sleep 6"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=None if runner.user else {**os.environ, **runner.env})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        cli = _supervisor_pid(proc)
        (job,) = cgroupfs.job_cgroups(runner.name, cli)
        scope = job.parent.parent
        assert job.parent.name == v2.JOBS and re.fullmatch(rf"sandbox-{cli}-1\.scope",
                                                           scope.name), job
        assert _read(scope / "cgroup.procs") == ""  # no internal processes
        assert {"memory", "pids"} <= set(_read(scope / "cgroup.subtree_control").split())
        assert {"memory", "pids"} <= set(_read(job.parent / "cgroup.subtree_control").split())
        (spawner,) = spawners(cli)
        assert str(spawner) in _read(scope / v2.LEAF / "cgroup.procs").split()
        assert "sandbox-" not in cgroupfs.own_cgroup(cli), "the caller's process was moved"
        assert _read(job / "memory.max") == str(64 << 20)
        if (job / "memory.swap.max").exists():
            assert _read(job / "memory.swap.max") == "0"
        assert _read(job / "pids.max") == "21"  # the job's 20 and its sandbox's init
        shown = _show(runner, scope.name, "Delegate", "ActiveState")
        assert shown == {"Delegate": "yes", "ActiveState": "active"}, shown
        if _uid(runner) == 0:
            assert os.getxattr(scope, "trusted.delegate") == b"1"
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert cgroupfs.wait_until(lambda: not scope.exists()), "the scope outlived its supervisor"
    _no_stale_cgroups()


def test_cgroup_kill_empties_a_busy_cgroup_and_the_scope_goes(root_runner: Runner) -> None:
    """The backend in this process, as a supervisor uses it: a scope for a stand-in spawner,
    a job cgroup with a process in it, remove() (cgroup.kill), release()."""
    assert cgroupfs.UNIFIED is not None
    before = cgroupfs.own_cgroup()
    helper = subprocess.Popen(["sleep", "60"])
    try:
        manager = v2.V2Manager.for_current_process(cgroupfs.UNIFIED)
        assert manager.scope
        manager.adopt(helper.pid)
        assert cgroupfs.own_cgroup(helper.pid) == f"{manager.base}/{v2.LEAF}"
        cg = manager.create(f"{os.getpid()}-kill")
        cg.set_limits(memory=32 << 20, pids=4)
        cg.add(helper.pid)
        assert cg.pids() == [helper.pid]
        cg.remove()
        assert helper.wait(timeout=10) == -9 and not cg.path.exists()
        scope = manager.base_path
        manager.release()
        assert cgroupfs.wait_until(lambda: not scope.exists()), "systemd kept the empty scope"
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    assert cgroupfs.own_cgroup() == before


def test_several_supervisors_at_once_from_one_shell(runner: Runner, shared_tmp: Path) -> None:
    out = shared_tmp / "out"
    out.mkdir()
    out.chmod(0o777)
    r = _shell(runner, f"for i in 1 2 3 4; do {SANDBOX} exec --json --image busybox --memory 32M "
                       f"sh -c 'echo job $0' $i > {out}/$i.json & done; wait")
    assert r.returncode == 0, r.stderr
    results = [json.loads((out / f"{i}.json").read_text()) for i in range(1, 5)]
    assert [(x["status"], x["stdout"]) for x in results] == [
        ("ok", f"job {i}\n") for i in range(1, 5)], results
    _no_stale_cgroups()


def test_in_a_delegated_scope_shared_with_a_shell(runner: Runner) -> None:
    """`systemd-run --scope -p Delegate=yes sh -c '...'`: the shell and the CLIs share the
    delegated scope; the first CLI moves them into its leaf, jobs go beside it."""
    user = "" if _uid(runner) == 0 else "--user"
    script = (f"{SANDBOX} exec --json --image busybox echo a > /dev/null & "
              f"{SANDBOX} exec --json --image busybox sh -c 'cat /proc/self/cgroup' & wait; "
              "cat /proc/self/cgroup")
    r = _shell(runner, f"systemd-run {user} --scope -p Delegate=yes --quiet sh -c \"{script}\"")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    job, shell = json.loads(lines[0]), lines[1]
    assert job["status"] == "ok" and job["stdout"] == "0::/\n", job  # its own cgroup ns
    assert re.fullmatch(r"0::/.*/run-[^/]+\.scope/sandbox-leaf", shell), shell
    _no_stale_cgroups()


def test_a_delegated_cgroup_named_by_sandbox_cgroup(runner: Runner) -> None:
    """As in a container whose cgroup is delegated (no systemd inside): root made D for the
    user and put the user's shell in it; SANDBOX_CGROUP=D arranges it for the CLIs."""
    assert cgroupfs.UNIFIED is not None
    if os.geteuid() != 0:
        pytest.skip("delegating a cgroup to a user takes root (the root run does it for both)")
    d = cgroupfs.UNIFIED / f"sandbox-tests-deleg-{os.getpid()}"
    d.mkdir()
    try:
        uid = _uid(runner)
        for f in (d, d / "cgroup.procs", d / "cgroup.subtree_control", d / "cgroup.threads"):
            os.chown(f, uid, -1)
        rel = str(d.relative_to(cgroupfs.UNIFIED))
        env = {"SANDBOX_CGROUP": rel}
        script = (f"read go; for i in 1 2; do {SANDBOX} exec --json --image busybox "
                  "echo $i > /dev/null & done; wait; cat /proc/self/cgroup")
        pairs = [f"{k}={v}" for k, v in {**runner.env, **env}.items()]
        argv = ["sh", "-c", script] if runner.user is None else [
            "runuser", "-u", runner.user, "--", "env", "-i", *pairs, "sh", "-c", script]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env={**os.environ, **runner.env, **env} if runner.user is None
                                else None)
        shell = proc.pid
        if runner.user is not None:  # runuser's child is the user's shell
            assert cgroupfs.wait_until(lambda: bool(_children(proc.pid)), 10)
            shell = _children(proc.pid)[0]
        (d / "cgroup.procs").write_text(str(shell))  # what a container runtime would do
        out, err = proc.communicate(b"go\n", timeout=300)
        assert proc.returncode == 0, err
        assert out.decode().strip() == f"0::/{rel}/{v2.LEAF}", out
        assert {"memory", "pids"} <= set(_read(d / "cgroup.subtree_control").split())
        assert not (d / v2.JOBS).exists(), "sandbox-jobs is removed once empty"
    finally:
        for sub in (d / v2.JOBS, d / v2.LEAF, d):
            if sub.exists():
                cgroupfs.wait_until(lambda sub=sub: not _read(sub / "cgroup.procs"), 10)
                sub.rmdir()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_the_python_api_inside_a_test_runner(root_runner: Runner) -> None:
    """This very process (pytest, in a login session's scope) runs jobs in-process: its
    spawner gets a scope; pytest itself stays where it is."""
    before = cgroupfs.own_cgroup()
    with Client(mode="embedded") as c:
        ok = c.run(JobSpec(image="busybox", argv=("echo", "hi"), limits=Limits(memory=64 << 20)))
        hog = c.run(JobSpec(image="busybox", argv=(
            "sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' x); echo ${#x}"),
            limits=Limits(memory=32 << 20)))
    assert (ok.status.value, ok.stdout) == ("ok", b"hi\n"), ok
    assert hog.status.value == "memory_limit", hog  # memory.events' oom_kill
    assert cgroupfs.own_cgroup() == before
    _no_stale_cgroups()


@pytest.fixture
def socket_dir(runner: Runner) -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sandbox-v2-daemon-"))
    os.chown(path, _uid(runner), -1)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_daemon_started_on_demand_is_a_delegated_unit(runner: Runner,
                                                        socket_dir: Path) -> None:
    sock = socket_dir / "sandbox.sock"
    unit = client_module.daemon_unit(sock)
    env = {"SANDBOX_DAEMON": "start", "SANDBOX_SOCKET": str(sock)}
    try:
        first = exec_result(runner.run(["exec", "--json", "--image", "busybox", "echo", "1"],
                                       extra_env=env, timeout=300))
        shown = _show(runner, unit, "ActiveState", "Delegate", "MainPID", "ControlGroup")
        second = exec_result(runner.run(["exec", "--json", "--image", "busybox", "echo", "2"],
                                        extra_env=env, timeout=300))
        again = _show(runner, unit, "MainPID")
        assert (first["status"], second["status"]) == ("ok", "ok"), (first, second)
        assert shown["ActiveState"] == "active" and shown["Delegate"] == "yes", shown
        assert again["MainPID"] == shown["MainPID"], "the second job used another daemon"
        daemon = int(shown["MainPID"])
        assert cgroupfs.UNIFIED is not None
        assert cgroupfs.own_cgroup(daemon) == f"{shown['ControlGroup'].strip('/')}/{v2.LEAF}"
        jobs = cgroupfs.UNIFIED / shown["ControlGroup"].strip("/") / v2.JOBS
        warm = cgroupfs.job_cgroups(runner.name, daemon)  # the warm pool's sandboxes
        assert warm and all(p.parent == jobs for p in warm), warm
    finally:
        _systemctl(runner, "stop", unit)
    assert cgroupfs.wait_until(lambda: not sock.exists()), "the daemon did not stop"
    assert cgroupfs.wait_until(lambda: _show(runner, unit, "LoadState") == {
        "LoadState": "not-found"}), "the unit was not collected"
    _no_stale_cgroups()


def test_doctor_says_what_works(runner: Runner) -> None:
    r = runner.run(["doctor"])
    out = r.stdout.decode()
    assert r.returncode == 0, out
    assert re.search(r"^ok   cgroups .*cgroup v2 .*sandbox-\d+-1\.scope; systemd scope; "
                     r"memory pids cpu\)$", out, re.M), out
    _no_stale_cgroups()


def test_doctors_fix_for_a_user_without_a_manager_is_what_works(user_runner: Runner) -> None:
    uid = _uid(user_runner)
    private = Path(f"/run/user/{uid}/systemd/private")
    subprocess.run(["loginctl", "disable-linger", TEST_USER], check=True)
    try:
        assert cgroupfs.wait_until(lambda: not private.exists(), 60)
        r = user_runner.run(["doctor"])
        out = r.stdout.decode()
        assert r.returncode == 1 and re.search(r"^FAIL cgroups", out, re.M), out
        fix = re.search(r"^     fix: .*`(loginctl enable-linger \S+)`", out, re.M)
        assert fix and fix.group(1) == f"loginctl enable-linger {TEST_USER}", out
        err = user_runner.run(["exec", "--image", "busybox", "true"])
        assert err.returncode == 125 and len(err.stderr.decode().strip().splitlines()) == 1
        subprocess.run(fix.group(1).split(), check=True)  # as root, as the fix says
        assert cgroupfs.wait_until(private.exists, 60)
        again = user_runner.run(["doctor"])
        assert again.returncode == 0, again.stdout.decode()
    finally:
        subprocess.run(["loginctl", "enable-linger", TEST_USER], check=True)
        cgroupfs.wait_until(private.exists, 60)
    _no_stale_cgroups()


def test_errors_leave_nothing_behind(runner: Runner) -> None:
    missing = runner.run(["exec", "--image", "no-such-image", "true"])
    assert missing.returncode == 125 and b"no-such-image" in missing.stderr, missing.stderr
    bad = runner.run(["exec", "--image", "busybox", "true"],
                     extra_env={"SANDBOX_CGROUP": "no/such/cgroup"})
    err = bad.stderr.decode()
    assert bad.returncode == 125 and len(err.strip().splitlines()) == 1, err
    assert "does not exist" in err and "fix:" in err and "Traceback" not in err, err
    assert cgroupfs.UNIFIED is not None and not (cgroupfs.UNIFIED / "no").exists()
    time.sleep(0.1)
    _no_stale_cgroups()


def test_the_manager_answers_a_caller_with_children() -> None:
    """systemd 252's sd-bus server leaves bytes that arrive with the authentication's BEGIN
    unread until more come: a client that has children running (and so is a little slower
    to send BEGIN) got no answer at all. Connection pings until it is answered."""
    from sandbox.cgroups import systemd

    children = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        for _ in range(5):
            t0 = time.monotonic()
            with systemd.Connection(timeout=10) as conn:
                assert conn.call("Subscribe", None, ()) == ()
            assert time.monotonic() - t0 < 5
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_daemon_run_as_a_unit_with_delegate(runner: Runner, socket_dir: Path) -> None:
    """The README's way to keep a daemon running: a systemd unit with Delegate=yes."""
    sock = socket_dir / "sandbox.sock"
    unit = f"sandbox-tests-{os.getpid()}.service"
    user = "" if _uid(runner) == 0 else "--user"
    r = _shell(runner, f"systemd-run {user} --unit {unit} -p Delegate=yes --quiet {SANDBOX} "
                       f"daemon --socket {sock} --pool 1 --warm busybox")
    assert r.returncode == 0, r.stderr
    try:
        assert cgroupfs.wait_until(sock.exists, 120), _systemctl(runner, "status", unit)
        result = exec_result(runner.run(["exec", "--json", "--image", "busybox", "echo", "hi"],
                                        extra_env={"SANDBOX_SOCKET": str(sock)}))
        assert (result["status"], result["stdout"]) == ("ok", "hi\n"), result
        shown = _show(runner, unit, "MainPID", "ControlGroup")
        assert cgroupfs.own_cgroup(int(shown["MainPID"])) == (
            f"{shown['ControlGroup'].strip('/')}/{v2.LEAF}")
    finally:
        _systemctl(runner, "stop", unit)
    assert cgroupfs.wait_until(lambda: _show(runner, unit, "LoadState") == {
        "LoadState": "not-found"}), "the unit was not collected"
    _no_stale_cgroups()
