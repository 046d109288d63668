"""cgroup v1: one directory per job in each of the memory, pids and cpuacct hierarchies."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from pathlib import Path

from ..errors import CgroupError
from . import Stats, user_name
from . import write_file as _write

CONTROLLERS = ("memory", "pids", "cpuacct")
SUBTREE = "sandbox"
_JOB_RE = re.compile(r"^(\d+)-[0-9a-z]+$")


def _read(path: str | Path) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: str | Path) -> int:
    return int(_read(path).split()[0])


class V1Cgroup:
    """A job's cgroup: ``<hierarchy>/<base>/<name>`` in each controller (paths as strings:
    this is on every job's path)."""

    def __init__(self, name: str, dirs: dict[str, str], swap_accounted: bool) -> None:
        self.name = name
        self.dirs = dirs
        self.swap_accounted = swap_accounted

    def set_limits(self, *, memory: int, pids: int) -> None:
        mem = self.dirs["memory"]
        # memsw must stay >= the memory limit: lower it last when shrinking, raise it first
        # when growing; with swap accounted it is the limit that counts swap in.
        files = [f"{mem}/memory.limit_in_bytes"]
        if self.swap_accounted:
            sw = f"{mem}/memory.memsw.limit_in_bytes"
            files = [sw, *files] if memory > _read_int(sw) else [*files, sw]
        for f in files:
            _write(f, str(memory))
        _write(f"{self.dirs['pids']}/pids.max", str(pids))

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            _write(f"{d}/cgroup.procs", str(pid))

    def procs_files(self) -> list[str]:
        """One ``cgroup.procs`` per controller: a process joins by writing 0 to each."""
        return [f"{d}/cgroup.procs" for d in self.dirs.values()]

    def cpu_time(self) -> float:
        return _read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") / 1e9

    def oom_killed(self) -> bool:
        for line in _read(f"{self.dirs['memory']}/memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def sample(self) -> None:
        """Nothing to sample: the kernel keeps the peak (memory.max_usage_in_bytes)."""

    def stats(self) -> Stats:
        mem = self.dirs["memory"]
        peak_file = ("memory.memsw.max_usage_in_bytes" if self.swap_accounted
                     else "memory.max_usage_in_bytes")
        return Stats(cpu_time=self.cpu_time(), memory_peak=_read_int(f"{mem}/{peak_file}"),
                     oom_killed=self.oom_killed())

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(FileNotFoundError):
                out.update(int(x) for x in _read(f"{d}/cgroup.procs").split())
        return sorted(out)

    def remove(self) -> None:
        """Remove the job's directories; kill stragglers (ours by construction) first."""
        for attempt in range(200):
            remaining = False
            for d in self.dirs.values():
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}") from None
                    remaining = True
            if not remaining:
                return
            if attempt % 20 == 0:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        raise CgroupError(f"cgroup {self.name} is still busy after killing its processes")


class V1Manager:
    version = 1

    def __init__(self, roots: dict[str, Path], base: str, *, on_demand: bool = False) -> None:
        self.roots = roots
        self.base = base
        # root's own subtree (below SUBTREE): made when missing, removed when left empty
        self.on_demand = on_demand
        self._bases = {c: str(r / base) for c, r in roots.items()}
        self.swap_accounted = (roots["memory"] / base / "memory.memsw.limit_in_bytes").exists()

    @classmethod
    def for_user(cls, hierarchies: dict[str, Path]) -> V1Manager:
        base = os.environ.get("SANDBOX_CGROUP") or f"{SUBTREE}/{user_name()}"
        base = base.strip("/")
        on_demand = os.geteuid() == 0 and base.startswith(f"{SUBTREE}/")
        roots = {c: hierarchies[c] for c in CONTROLLERS}
        for c, root in roots.items():
            path = root / base
            if not path.is_dir():
                if os.geteuid() != 0:
                    raise CgroupError(
                        f"no cgroup subtree for you at {path}; as root run "
                        f"`sandbox system setup --user {user_name()}` once")
                path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise CgroupError(f"cgroup subtree {path} is not writable by you; as root run "
                                  f"`sandbox system setup --user {user_name()}`")
            if c == "memory" and os.geteuid() == 0 and (path / "memory.use_hierarchy").exists():
                with contextlib.suppress(CgroupError):
                    if _read_int(path / "memory.use_hierarchy") != 1:
                        _write(path / "memory.use_hierarchy", "1")
        return cls(roots, base, on_demand=on_demand)

    def adopt(self, pid: int) -> None:
        """Nothing to do: on v1 a process whose uid owns the job's cgroup may join it from
        anywhere."""

    def describe(self) -> str:
        return f"cgroup v1 ({', '.join(f'{c}:{r / self.base}' for c, r in self.roots.items())})"

    def create(self, name: str) -> V1Cgroup:
        try:
            try:
                return self._create(name)
            except FileNotFoundError:
                if not self.on_demand:
                    raise
                # Another supervisor of root's removed the subtree as it went empty.
                for base in self._bases.values():
                    os.makedirs(base, exist_ok=True)
                return self._create(name)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {name} under {self.base}: "
                              f"{e.strerror}") from None

    def _create(self, name: str) -> V1Cgroup:
        dirs: dict[str, str] = {}
        try:
            for c, root in self._bases.items():
                d = f"{root}/{name}"
                os.mkdir(d)
                dirs[c] = d
        except OSError:
            for d in dirs.values():
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        return V1Cgroup(name, dirs, self.swap_accounted)

    def release(self) -> None:
        """Remove root's on-demand subtree, and SUBTREE above it, where nothing is left in
        them: a busy one (another supervisor's jobs, another user's delegated subtree)
        stays, and the next supervisor makes what is missing again."""
        if not self.on_demand:
            return
        for root in self.roots.values():
            path = root / self.base
            while path != root:
                try:
                    path.rmdir()
                except OSError:  # not empty, or already gone
                    break
                path = path.parent

    def cleanup_stale(self, alive: set[str] | None = None) -> int:
        """Remove job cgroups left by supervisors that died (their pid is gone)."""
        removed = 0
        names: set[str] = set()
        for root in self.roots.values():
            with contextlib.suppress(FileNotFoundError):
                names.update(p.name for p in (root / self.base).iterdir() if p.is_dir())
        for name in sorted(names):
            m = _JOB_RE.match(name)
            if not m or (alive is not None and name in alive):
                continue
            if alive is None and Path(f"/proc/{m.group(1)}").exists():
                continue
            V1Cgroup(name, {c: f"{b}/{name}" for c, b in self._bases.items()},
                     self.swap_accounted).remove()
            removed += 1
        return removed
