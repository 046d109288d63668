"""cgroup v2: job cgroups in a delegated subtree of the unified hierarchy.

The subtree is ``$SANDBOX_CGROUP`` if set, else the cgroup this process runs in, which must
be delegated to us (writable ``cgroup.procs`` and ``cgroup.subtree_control``), as systemd
does for ``systemd-run --user --scope -p Delegate=yes`` or a ``Delegate=yes`` service.
Because of the "no internal processes" rule, the supervisor first moves itself into a leaf
``<base>/supervisor-<pid>`` and then enables the controllers for the jobs beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from pathlib import Path

from ..errors import CgroupError
from . import Stats
from . import write_file as _write

NEEDED = ("memory", "pids")
_JOB_RE = re.compile(r"^(\d+)-[0-9a-z]+$")


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


class V2Cgroup:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def set_limits(self, *, memory: int, pids: int) -> None:
        _write(self.path / "memory.max", str(memory))
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", "0")  # so memory.max bounds swap too
        _write(self.path / "pids.max", str(pids))

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def procs_files(self) -> list[str]:
        return [str(self.path / "cgroup.procs")]

    def cpu_time(self) -> float:
        return _keyed(self.path / "cpu.stat").get("usage_usec", 0) / 1e6

    def oom_killed(self) -> bool:
        return _keyed(self.path / "memory.events").get("oom_kill", 0) > 0

    def stats(self) -> Stats:
        peak = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            peak = int((self.path / "memory.peak").read_text())
        return Stats(cpu_time=self.cpu_time(), memory_peak=peak, oom_killed=self.oom_killed())

    def pids(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(int(x) for x in (self.path / "cgroup.procs").read_text().split())
        return []

    def remove(self) -> None:
        for attempt in range(200):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {e.strerror}") from None
            if attempt % 20 == 0 and (self.path / "cgroup.kill").exists():
                with contextlib.suppress(CgroupError):
                    _write(self.path / "cgroup.kill", "1")
            time.sleep(0.005)
        raise CgroupError(f"cgroup {self.path} is still busy after cgroup.kill")


class V2Manager:
    version = 2

    def __init__(self, root: Path, base: str) -> None:
        self.root = root
        self.base = base

    @property
    def base_path(self) -> Path:
        return self.root / self.base

    @classmethod
    def for_current_process(cls, root: Path) -> V2Manager:
        explicit = os.environ.get("SANDBOX_CGROUP")
        if explicit:
            base = explicit.strip("/")
        else:
            own = ""
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    own = line[3:].strip("/")
            base = own
            leaf = Path(base).name
            if leaf.startswith("supervisor-"):  # we moved ourselves already
                base = str(Path(base).parent)
        manager = cls(root, base)
        manager._prepare()
        return manager

    def describe(self) -> str:
        return f"cgroup v2 ({self.base_path})"

    def _prepare(self) -> None:
        path = self.base_path
        if not os.access(path / "cgroup.procs", os.W_OK) or not os.access(
                path / "cgroup.subtree_control", os.W_OK):
            raise CgroupError(
                f"cgroup v2 subtree {path} is not delegated to you; run under "
                "`systemd-run --user --scope -p Delegate=yes`, or set SANDBOX_CGROUP to a "
                "delegated cgroup")
        available = (path / "cgroup.controllers").read_text().split()
        missing = [c for c in NEEDED if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 subtree {path} lacks the {', '.join(missing)} "
                              "controller(s); enable them with Delegate= (systemd)")
        leaf = path / f"supervisor-{os.getpid()}"
        leaf.mkdir(exist_ok=True)
        with contextlib.suppress(CgroupError):
            _write(leaf / "cgroup.procs", str(os.getpid()))
        enabled = (path / "cgroup.subtree_control").read_text().split()
        wanted = [c for c in (*NEEDED, "cpu") if c in available and c not in enabled]
        if wanted:
            _write(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def release(self) -> None:
        """Nothing to give back: the delegated subtree is not ours to remove, and our own
        ``supervisor-PID`` leaf holds us until we exit (`cleanup_stale` removes it then)."""

    def create(self, name: str) -> V2Cgroup:
        path = self.base_path / name
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
        return V2Cgroup(name, path)

    def cleanup_stale(self, alive: set[str] | None = None) -> int:
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for p in self.base_path.iterdir():
                m = _JOB_RE.match(p.name) or re.match(r"^supervisor-(\d+)$", p.name)
                if not m or not p.is_dir() or (alive is not None and p.name in alive):
                    continue
                if Path(f"/proc/{m.group(1)}").exists():
                    continue
                V2Cgroup(p.name, p).remove()
                removed += 1
        return removed
