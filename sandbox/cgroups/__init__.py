"""Per-job cgroups behind one interface, with a v1 and a v2 backend.

A job gets its own cgroup (one per controller on v1) under a subtree we own: created when
the sandbox is prepared, limited when the job starts, read for CPU time, peak memory and OOM
kills, and removed afterwards. Nothing outside our own subtree is ever written.

Where the subtree is:

* v1 (hybrid hosts): ``/sys/fs/cgroup/<controller>/sandbox/<user>`` for memory, pids and
  cpuacct. root creates it on demand and removes it (and ``sandbox``) once nothing is left
  in it; for anyone else ``sandbox system setup --user NAME`` (as root) creates it owned by
  NAME.
* v2: a delegated cgroup we run in (systemd ``Delegate=yes``, e.g. under
  ``systemd-run --user --scope -p Delegate=yes``, or one root prepared and placed us in).
  ``$SANDBOX_CGROUP`` names an explicit subtree (a path below the hierarchy's root).

A limit that cannot be enforced is an error, never silently ignored.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import CgroupError

CGROUP_ROOT = Path(os.environ.get("SANDBOX_CGROUP_FS", "/sys/fs/cgroup"))


@dataclass(frozen=True, slots=True)
class Stats:
    cpu_time: float      # seconds, all processes and threads
    memory_peak: int     # bytes, swap included where the kernel accounts it
    oom_killed: bool     # the cgroup's OOM killer fired


class JobCgroup(Protocol):
    """One job's cgroup."""

    name: str

    def set_limits(self, *, memory: int, pids: int) -> None: ...
    def add(self, pid: int) -> None: ...
    def procs_files(self) -> list[str]: ...
    def cpu_time(self) -> float: ...
    def oom_killed(self) -> bool: ...
    def sample(self) -> None: ...
    def stats(self) -> Stats: ...
    def pids(self) -> list[int]: ...
    def remove(self) -> None: ...


class Manager(Protocol):
    """Creates job cgroups under our own subtree."""

    version: int
    base: str

    def adopt(self, pid: int) -> None: ...
    def create(self, name: str) -> JobCgroup: ...
    def cleanup_stale(self, alive: set[str] | None = None) -> int: ...
    def release(self) -> None: ...
    def describe(self) -> str: ...


def write_file(path: str | Path, value: str) -> None:
    """Write a cgroup control file; errors become `CgroupError` naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"cannot open {path}: {e.strerror}", errno=e.errno or 0) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}",
                          errno=e.errno or 0) from None
    finally:
        os.close(fd)


def user_name(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def mounted_hierarchies() -> dict[str, Path]:
    """``controller -> mount point`` for v1 hierarchies, and ``"unified" -> path`` for v2."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if rfields[0] == "cgroup2":
            found.setdefault("unified", mount_point)
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                if opt in ("memory", "pids", "cpuacct", "cpu", "freezer"):
                    found.setdefault(opt, mount_point)
    return found


def detect() -> Manager:
    """Pick the backend this host needs and find our subtree; `CgroupError` if none."""
    from . import v1, v2  # noqa: PLC0415

    hierarchies = mounted_hierarchies()
    if all(c in hierarchies for c in v1.CONTROLLERS):
        return v1.V1Manager.for_user(hierarchies)
    if "unified" in hierarchies:
        return v2.V2Manager.for_current_process(hierarchies["unified"])
    raise CgroupError("no cgroup hierarchy is mounted (need cgroup v2, or v1 with memory, "
                      "pids and cpuacct)")
