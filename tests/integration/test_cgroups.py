"""Both cgroup backends on real cgroupfs.

v1 is what this host runs (memory, pids, cpuacct hierarchies). v2 is exercised on the host's
unified hierarchy, which has no controllers here: creating, joining, CPU accounting,
cgroup.kill and removal are real; a memory or pids limit must be refused loudly (a limit that
cannot be enforced is an error, never silently ignored). Only cgroups these tests create
are touched.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import v1, v2
from sandbox.errors import CgroupError
from tests import cgroupfs
from tests.conftest import Runner, need

pytestmark = pytest.mark.cgroups


def _burn(seconds: float) -> subprocess.Popen[bytes]:
    """A process that, once told (a line on stdin: after it joined the cgroup), allocates
    10 MB and burns ``seconds`` of CPU, then sleeps."""
    return subprocess.Popen(["/usr/bin/python3", "-c",
                             "import sys, time\nsys.stdin.readline()\n"
                             "x = bytearray(10 << 20)\nt = time.process_time()\n"
                             f"while time.process_time() - t < {seconds}: pass\n"
                             "time.sleep(60)"], stdin=subprocess.PIPE)


def _go(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()


@pytest.fixture
def v1_manager() -> Iterator[v1.V1Manager]:
    """The v1 manager a supervisor of ours would use; released afterwards, as a supervisor
    releases it when it closes."""
    cgroupfs.v1_only()
    hierarchies = cgroupfs.HIERARCHIES
    manager = v1.V1Manager.for_user(hierarchies)
    yield manager
    manager.release()


def test_v1_backend_end_to_end(v1_manager: v1.V1Manager) -> None:
    manager = v1_manager
    cg = manager.create(f"{os.getpid()}-cgtest")
    proc = _burn(0.3)
    try:
        cg.set_limits(memory=64 << 20, pids=8)
        cg.add(proc.pid)
        assert proc.pid in cg.pids()
        _go(proc)
        deadline = time.monotonic() + 10
        while cg.cpu_time() < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = cg.stats()
        assert 0.25 <= stats.cpu_time < 5
        assert 10 << 20 <= stats.memory_peak <= 64 << 20
        assert not stats.oom_killed
        limit = Path(cg.dirs["memory"]) / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 64 << 20
        assert int((Path(cg.dirs["pids"]) / "pids.max").read_text()) == 8
    finally:
        cg.remove()  # kills what is left in it, then removes every directory
        proc.wait()
    assert not any(Path(d).exists() for d in cg.dirs.values())


def test_v1_stale_cgroups_of_dead_supervisors_are_removed(v1_manager: v1.V1Manager) -> None:
    manager = v1_manager
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now: a supervisor that died
    stale = manager.create(f"{dead.pid}-1")
    mine = manager.create(f"{os.getpid()}-stale-check")
    try:
        assert manager.cleanup_stale() >= 1
        assert not any(Path(d).exists() for d in stale.dirs.values())
        assert all(Path(d).exists() for d in mine.dirs.values())
    finally:
        mine.remove()


def test_roots_v1_subtree_is_made_on_demand_and_goes_once_empty(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """root's subtree below ours is made when a supervisor needs it and removed by the last
    one to release it; a supervisor whose subtree another one removed makes it again."""
    cgroupfs.v1_only()
    hierarchies = cgroupfs.HIERARCHIES
    need(os.geteuid() == 0, "root's on-demand subtree")
    base = f"{v1.SUBTREE}/pytest-on-demand-{os.getpid()}"
    monkeypatch.setenv("SANDBOX_CGROUP", base)
    paths = [hierarchies[c] / base for c in v1.CONTROLLERS]
    first, second = (v1.V1Manager.for_user(hierarchies) for _ in range(2))
    assert first.on_demand and all(p.is_dir() for p in paths)
    job = first.create(f"{os.getpid()}-busy")
    try:
        second.release()  # first's job is still there
        assert all(p.is_dir() for p in paths)
    finally:
        job.remove()
    second.release()  # empty now: gone (SUBTREE too, unless another subtree is in it)
    assert not any(p.exists() for p in paths)
    again = first.create(f"{os.getpid()}-again")  # first made it again
    try:
        assert all(Path(d).is_dir() for d in again.dirs.values())
    finally:
        again.remove()
        first.release()
    assert not any(p.exists() for p in paths)


def test_a_delegated_subtree_is_never_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A subtree outside ours (named by SANDBOX_CGROUP) is not ours to remove."""
    cgroupfs.v1_only()
    hierarchies = cgroupfs.HIERARCHIES
    base = f"pytest-delegated-{os.getpid()}"
    paths = [hierarchies[c] / base for c in v1.CONTROLLERS]
    for p in paths:
        p.mkdir()
    try:
        monkeypatch.setenv("SANDBOX_CGROUP", base)
        manager = v1.V1Manager.for_user(hierarchies)
        assert not manager.on_demand
        manager.release()
        assert all(p.is_dir() for p in paths)
    finally:
        for p in paths:
            p.rmdir()


def test_a_root_supervisor_leaves_no_cgroup_behind(root_runner: Runner) -> None:
    cgroupfs.v1_only()
    hierarchies = cgroupfs.HIERARCHIES
    base = f"{v1.SUBTREE}/pytest-cli-{os.getpid()}"
    r = root_runner.run(["exec", "--image", "busybox", "true"],
                        extra_env={"SANDBOX_CGROUP": base, "SANDBOX_SOCKET": "/nonexistent/x"})
    assert r.returncode == 0, r.stderr
    assert not any((hierarchies[c] / base).exists() for c in v1.CONTROLLERS)


@pytest.fixture
def unified_base() -> Iterator[str]:
    """A cgroup of ours in the hybrid host's unified hierarchy, which has no controllers.
    (On a pure v2 host test_cgroups_v2.py covers the backend on a delegated subtree.)"""
    cgroupfs.v1_only()
    need(cgroupfs.UNIFIED is not None, "a cgroup2 mount")
    assert cgroupfs.UNIFIED is not None
    base = f"sandbox-tests-{os.getpid()}"
    (cgroupfs.UNIFIED / base).mkdir()
    yield base
    os.rmdir(cgroupfs.UNIFIED / base)


def test_v2_backend_on_the_unified_hierarchy(unified_base: str) -> None:
    assert cgroupfs.UNIFIED is not None
    manager = v2.V2Manager(cgroupfs.UNIFIED, unified_base)
    (manager.jobs_path).mkdir()
    cg = manager.create(f"{os.getpid()}-1")
    proc = _burn(0.3)
    try:
        cg.add(proc.pid)
        assert cg.pids() == [proc.pid]
        _go(proc)
        deadline = time.monotonic() + 10
        while cg.cpu_time() < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cg.cpu_time() >= 0.25  # from cpu.stat usage_usec
        assert not cg.oom_killed()
        # no memory or pids controller is enabled here: the limit must not pass silently
        with pytest.raises(CgroupError, match=r"memory\.max"):
            cg.set_limits(memory=64 << 20, pids=8)
    finally:
        cg.remove()  # cgroup.kill, then rmdir
        proc.wait()
    assert proc.returncode == -9
    assert not cg.path.exists()
    manager.release()
    assert not manager.jobs_path.exists()


def test_v2_needs_a_delegated_subtree_with_controllers(unified_base: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert cgroupfs.UNIFIED is not None
    monkeypatch.setenv("SANDBOX_CGROUP", unified_base)
    with pytest.raises(CgroupError, match="lacks the memory, pids controller") as e:
        v2.V2Manager.for_current_process(cgroupfs.UNIFIED)
    assert e.value.fix  # what to do about it, for doctor's fix line
    assert not (cgroupfs.UNIFIED / unified_base / v2.LEAF).exists()  # nothing moved
