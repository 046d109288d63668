"""cgroup v2: job cgroups in a delegated subtree of the unified hierarchy.

cgroup v2 has two rules that decide the shape. A process may be moved only within a subtree
delegated to its user (write access to ``cgroup.procs`` of the common ancestor), and a
cgroup that enables controllers for its children holds no process of its own ("no internal
processes"). So we find, or ask for, one delegated cgroup D and arrange it::

    D/                  memory, pids (and cpu) enabled for its children; no process
      sandbox-leaf/     every process that was in D: the supervisor or only its spawner,
                        and whatever shared D with it (a shell, a test runner)
      sandbox-jobs/     memory, pids and cpu enabled; no process
        PID-N/          one sandbox: its init and the job (PID: the supervisor's)

D is, in this order:

1. ``$SANDBOX_CGROUP`` (a path below the hierarchy's root), when set;
2. the cgroup we run in, when it was delegated to us: systemd marks a ``Delegate=yes`` unit
   of the system manager with the ``trusted.delegate`` xattr, and says so over D-Bus for a
   user manager's; where no systemd runs (a container), a cgroup we can write is ours; a
   cgroup named ``sandbox-leaf`` means its parent is D, arranged already;
3. otherwise, on a systemd host, a transient scope ``sandbox-PID-N.scope`` with
   ``Delegate=yes`` that systemd makes around our spawner (`adopt`): root's in the system
   manager, a user's in their user manager. The caller's own process is never moved. The
   scope goes when its last process does; systemd then removes its cgroups.

Several supervisors may share D (two CLIs run from one delegated shell): arranging is
idempotent, and each names its jobs after its own pid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from pathlib import Path

from ..errors import CgroupError
from . import Stats, user_name
from . import write_file as _write

NEEDED = ("memory", "pids")
WANTED = ("memory", "pids", "cpu")
LEAF = "sandbox-leaf"
JOBS = "sandbox-jobs"
_JOB_RE = re.compile(r"^(\d+)-[0-9a-z]+$")


def _keyed(path: Path) -> dict[str, int]:
    """``key value`` lines; nothing once the cgroup is gone (ENOENT, or ENODEV while the
    kernel tears it down: systemd removes a dead spawner's scope with its job cgroups)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def cgroup_of(pid: int | str = "self") -> str:
    """The v2 cgroup of ``pid``, relative to the hierarchy's root ("" for the root)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].strip().strip("/")
    raise CgroupError(f"process {pid} is in no cgroup v2 hierarchy")


def _within(path: str, base: str) -> bool:
    return not base or path == base or path.startswith(base + "/")


class V2Cgroup:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        # memory.peak came with Linux 5.19; before it the watchdog samples memory.current
        self._has_peak = (path / "memory.peak").exists()
        self._sampled = 0

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

    def sample(self) -> None:
        if not self._has_peak:
            with contextlib.suppress(OSError, ValueError):
                current = int((self.path / "memory.current").read_text())
                self._sampled = max(self._sampled, current)

    def stats(self) -> Stats:
        peak = 0
        if self._has_peak:
            with contextlib.suppress(OSError, ValueError):
                peak = int((self.path / "memory.peak").read_text())
        else:
            self.sample()
            peak = self._sampled
        return Stats(cpu_time=self.cpu_time(), memory_peak=peak, oom_killed=self.oom_killed())

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return sorted(int(x) for x in (self.path / "cgroup.procs").read_text().split())
        return []

    def remove(self) -> None:
        for attempt in range(200):
            try:
                os.rmdir(self.path)
                return
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENODEV):  # gone (systemd removed it)
                    return
                if e.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {e.strerror}") from None
            if attempt % 20 == 0 and (self.path / "cgroup.kill").exists():
                with contextlib.suppress(CgroupError):
                    _write(self.path / "cgroup.kill", "1")
            time.sleep(0.005)
        raise CgroupError(f"cgroup {self.path} is still busy after cgroup.kill")


class V2Manager:
    """Job cgroups under ``D/sandbox-jobs`` (see the module's docstring)."""

    version = 2

    def __init__(self, root: Path, base: str, *, scope: bool = False) -> None:
        self.root = root
        self.base = base          # D, relative to root ("": the root, or no scope yet)
        self.scope = scope        # D is a transient scope systemd makes for our spawner
        self.origin = ""          # how D was found, for describe()
        self.controllers: list[str] = []
        self._scopes = 0
        self._ready = not scope   # D exists (a scope: once `adopt` has made it)

    @property
    def base_path(self) -> Path:
        return self.root / self.base

    @property
    def jobs_path(self) -> Path:
        return self.root / self.base / JOBS

    @classmethod
    def for_current_process(cls, root: Path) -> V2Manager:
        from . import systemd  # noqa: PLC0415

        explicit = os.environ.get("SANDBOX_CGROUP")
        if explicit:
            manager = cls(root, explicit.strip("/"))
            manager.origin = "SANDBOX_CGROUP"
            manager.arrange()
            return manager
        own = cgroup_of()
        if own.rpartition("/")[2] == LEAF:  # arranged by a supervisor we share D with
            manager = cls(root, own.rpartition("/")[0])
            manager.origin = "delegated"
        elif _delegated(root, own):
            manager = cls(root, own)
            manager.origin = "delegated"
        elif not systemd.running():
            if not _writable(root / own):
                raise CgroupError(
                    f"cgroup v2: your cgroup {root / own} is not delegated to you and no "
                    "systemd runs here to ask for one",
                    fix="run sandbox inside a cgroup delegated to you and name it with "
                        "SANDBOX_CGROUP=/path/below/the/cgroup/root")
            manager = cls(root, own)
            manager.origin = "writable, no systemd"
        else:
            manager = cls(root, "", scope=True)
            manager.origin = "systemd scope"
            return manager  # arranged in adopt(), once the spawner exists
        manager.arrange()
        return manager

    def describe(self) -> str:
        where = self.base_path if self._ready else "(a scope, not made yet)"
        return f"cgroup v2 ({where}; {self.origin}; {' '.join(self.controllers) or '-'})"

    # -- arranging D ------------------------------------------------------------------

    def arrange(self) -> None:
        """Enable the controllers in D (moving D's processes into its leaf first) and in
        D/sandbox-jobs. Idempotent; safe against another supervisor doing the same."""
        path = self.base_path
        if not path.is_dir():
            raise CgroupError(f"cgroup v2: {path} does not exist",
                              fix="create it (delegated to you) or unset SANDBOX_CGROUP")
        if not _writable(path):
            raise CgroupError(f"cgroup v2 subtree {path} is not delegated to you",
                              fix=_delegate_fix())
        available = (path / "cgroup.controllers").read_text().split()
        missing = [c for c in NEEDED if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 subtree {path} lacks the {', '.join(missing)} "
                              "controller(s)", fix=_controllers_fix(missing))
        self.controllers = [c for c in WANTED if c in available]
        # The hierarchy's real root (no cgroup.events) may hold processes and still enable
        # controllers; every other cgroup must be emptied into its leaf first.
        _enable(path, self.controllers, evacuate=(path / "cgroup.events").exists())
        self._ensure_jobs()

    def _ensure_jobs(self) -> None:
        jobs = self.jobs_path
        with contextlib.suppress(FileExistsError):
            jobs.mkdir()
        _enable(jobs, self.controllers, evacuate=False)

    def adopt(self, pid: int) -> None:
        """Place the process that forks the sandboxes (the spawner, just started) where its
        children may move into job cgroups: in D's subtree, or in a new systemd scope."""
        if self.scope:
            self._new_scope(pid)
            return
        if _within(cgroup_of(pid), self.base):
            return
        leaf = self.base_path / LEAF  # SANDBOX_CGROUP names a cgroup we are not in
        with contextlib.suppress(FileExistsError):
            leaf.mkdir()
        try:
            _write(leaf / "cgroup.procs", str(pid))
        except CgroupError as e:
            raise CgroupError(
                f"cgroup v2: cannot move the sandbox's spawner into {leaf} ({e.detail})",
                fix=f"start sandbox from inside {self.base_path} (cgroup v2 moves a process "
                    "only within a subtree delegated to its user)") from None

    def _new_scope(self, pid: int) -> None:
        from . import systemd  # noqa: PLC0415

        self._scopes += 1
        name = f"sandbox-{os.getpid()}-{self._scopes}.scope"
        systemd.start_scope(pid, name, f"sandbox supervisor {os.getpid()}: jobs' cgroups")
        self.base = cgroup_of(pid)
        self._ready = True
        self.arrange()

    # -- jobs -------------------------------------------------------------------------

    def create(self, name: str) -> V2Cgroup:
        path = self.jobs_path / name
        try:
            try:
                path.mkdir()
            except FileNotFoundError:
                # Another supervisor sharing D released sandbox-jobs as it went empty.
                if not self._ready:
                    raise CgroupError("cgroup v2: the supervisor's scope is not made "
                                      "yet") from None
                self._ensure_jobs()
                path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
        return V2Cgroup(name, path)

    def release(self) -> None:
        """Remove ``sandbox-jobs`` once empty (another supervisor's jobs keep it) and, in
        our own scope, the leaf our spawner has left: systemd then collects the scope."""
        if not self._ready:
            return
        with contextlib.suppress(OSError):
            self.jobs_path.rmdir()
        if self.scope:
            with contextlib.suppress(OSError):
                (self.base_path / LEAF).rmdir()

    def cleanup_stale(self, alive: set[str] | None = None) -> int:
        removed = 0
        if not self._ready:
            return 0
        with contextlib.suppress(FileNotFoundError):
            for p in self.jobs_path.iterdir():
                m = _JOB_RE.match(p.name)
                if not m or not p.is_dir() or (alive is not None and p.name in alive):
                    continue
                if alive is None and Path(f"/proc/{m.group(1)}").exists():
                    continue
                V2Cgroup(p.name, p).remove()
                removed += 1
        return removed


def _writable(path: Path) -> bool:
    return all(os.access(path / f, os.W_OK) for f in ("cgroup.procs", "cgroup.subtree_control"))


def _delegated(root: Path, own: str) -> bool:
    """Is the cgroup we run in (or the systemd unit it is part of) delegated to us?"""
    from . import systemd  # noqa: PLC0415

    if not own or not _writable(root / own):
        return False
    parts = own.split("/")
    units = [i for i, part in enumerate(parts) if part.endswith((".scope", ".service"))]
    if not units:
        return False
    unit = parts[units[-1]]
    unit_path = root.joinpath(*parts[:units[-1] + 1])
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(unit_path, attr) == b"1":
                return True
    if os.geteuid() == 0 or not systemd.running():
        return False  # the system manager marks what it delegates (above)
    return systemd.unit_delegated(unit)  # a user manager (systemd 252) marks nothing


def _enable(path: Path, controllers: list[str], *, evacuate: bool) -> None:
    """Enable ``controllers`` in ``path``'s subtree_control; with ``evacuate``, first move
    every process in ``path`` into its leaf (again, if one forked meanwhile)."""
    missing = [c for c in controllers
               if c not in (path / "cgroup.subtree_control").read_text().split()]
    if not missing:
        return
    for attempt in range(50):
        if evacuate:
            _evacuate(path)
        try:
            _write(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
            return
        except CgroupError as e:
            if e.errno != errno.EBUSY or attempt == 49:
                raise
        time.sleep(0.001)


def _evacuate(path: Path) -> None:
    procs = (path / "cgroup.procs").read_text().split()
    if not procs:
        return
    leaf = path / LEAF
    with contextlib.suppress(FileExistsError):
        leaf.mkdir()
    for pid in procs:
        try:
            _write(leaf / "cgroup.procs", pid)
        except CgroupError as e:
            if e.errno != errno.ESRCH:  # (it exited meanwhile)
                raise


def _delegate_fix() -> str:
    if os.geteuid() == 0:
        return "unset SANDBOX_CGROUP, or name a cgroup that exists"
    return (f"as root, `chown -R {user_name()} DIR` a cgroup DIR of yours, or unset "
            "SANDBOX_CGROUP (sandbox then asks systemd for a delegated scope)")


def _controllers_fix(missing: list[str]) -> str:
    if os.geteuid() == 0:
        return ("enable them on the way down (echo +memory +pids > "
                "PARENT/cgroup.subtree_control), or run where systemd manages cgroups")
    return (f"as root: `sandbox system setup --user {user_name()}` (has systemd delegate "
            f"{', '.join(missing)} and cpu to your user manager), then log in again")
