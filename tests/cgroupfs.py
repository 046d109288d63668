"""What the tests need to know about this host's cgroups, whichever backend it runs.

* v1 (this project's CI host, hybrid): job cgroups are ``<hierarchy>/sandbox/USER/PID-N``.
* pure v2 (the guest of scripts/test-cgroup2-vm.sh, most users' hosts): job cgroups are
  ``D/sandbox-jobs/PID-N`` somewhere in the unified hierarchy, D being a delegated cgroup
  (a systemd scope ``sandbox-PID-N.scope`` of the supervisor's, on a systemd host).

The v2 mount is found in /proc/self/mountinfo, never at a hard-coded path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.cgroups import systemd, v1, v2

HIERARCHIES = cgroups.mounted_hierarchies()
V1 = all(c in HIERARCHIES for c in v1.CONTROLLERS)
UNIFIED: Path | None = HIERARCHIES.get("unified")
V2 = not V1 and UNIFIED is not None  # a pure cgroup v2 host: the v2 backend is the one used
SYSTEMD = systemd.running()


def v1_only() -> None:
    """Skip, saying why, on a host that runs the v2 backend."""
    if not V1:
        pytest.skip("cgroup v1 only: this host runs pure cgroup v2 (the v2 backend has its "
                    "own tests, tests/integration/test_cgroups_v2.py)")


def v2_only() -> Path:
    """Skip, saying why, unless this is a pure cgroup v2 host; returns the v2 mount."""
    if not V2 or UNIFIED is None:
        pytest.skip("pure cgroup v2 only: this host uses cgroup v1 (run "
                    "./scripts/test-cgroup2-vm.sh for a pure cgroup v2 guest)")
    return UNIFIED


def _pid_alive(pid: str) -> bool:
    return Path(f"/proc/{pid}").exists()


def job_cgroups(user: str, supervisor: int) -> list[Path]:
    """The job cgroups of the supervisor with pid ``supervisor`` (run by ``user``)."""
    if V1:
        base = HIERARCHIES["memory"] / v1.SUBTREE / user
        return sorted(base.glob(f"{supervisor}-*")) if base.is_dir() else []
    if UNIFIED is None:
        return []
    return sorted(UNIFIED.glob(f"**/{v2.JOBS}/{supervisor}-*"))


def supervisor_scopes(supervisor: int) -> list[Path]:
    """The systemd scopes made for the spawners of supervisor ``supervisor`` (v2)."""
    if UNIFIED is None or V1:
        return []
    return sorted(UNIFIED.glob(f"**/sandbox-{supervisor}-*.scope"))


def stale_cgroups() -> list[str]:
    """Job cgroups (``<supervisor pid>-<n>``) and supervisor scopes whose supervisor is
    gone: a leak, unless systemd is still collecting them (give it a moment)."""
    found: list[str] = []
    if V1:
        for controller in v1.CONTROLLERS:
            for path in (HIERARCHIES[controller] / v1.SUBTREE).glob("*/*-*"):
                pid = path.name.split("-")[0]
                if path.is_dir() and pid.isdigit() and not _pid_alive(pid):
                    found.append(str(path))
        return found
    if UNIFIED is None:
        return found
    for path in UNIFIED.glob(f"**/{v2.JOBS}/*-*"):
        pid = path.name.split("-")[0]
        if pid.isdigit() and not _pid_alive(pid):
            found.append(str(path))
    for path in UNIFIED.glob("**/sandbox-*-*.scope"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _pid_alive(pid):
            found.append(str(path))
    return found


def wait_until(predicate: object, timeout: float = 30.0) -> bool:
    """Poll ``predicate()`` until it is true (systemd collects empty scopes on its own
    time, a few milliseconds on a host, longer under emulation)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def own_cgroup(pid: int | str = "self") -> str:
    return v2.cgroup_of(pid) if UNIFIED is not None else ""


def uid_of(user: str | None) -> int:
    import pwd

    return os.getuid() if user is None else pwd.getpwnam(user).pw_uid
