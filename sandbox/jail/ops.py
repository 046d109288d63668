"""The set-up operations a sandbox is built from: plain data, applied in order by `apply`.

A plan (see `plan.py`) is three lists of these:

* ``prepare``: run by the sandbox's init (pid 1 of the new namespaces) right after clone:
  id maps, mounts, pivot_root, hostname, loopback. A warm sandbox stops here and waits.
* ``go``: run by init when a job is handed over: copy files in, enter the cgroup namespace.
* ``launch``: run by init on itself: cwd, rlimits, uid drop, capabilities, no_new_privs,
  seccomp; then `Spawn` starts the job with posix_spawn, so the job inherits all of that and
  no code of ours ever runs between fork and exec.

Stdlib only: this module is imported by the spawner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SetIdMap:
    """Map one id each: ``inside`` <- ``outside`` (the caller's own uid and gid)."""

    uid_inside: int
    uid_outside: int
    gid_inside: int
    gid_outside: int


@dataclass(frozen=True, slots=True)
class JoinCgroup:
    """Write ``0`` to the ``cgroup.procs`` files received with the spawn request (``fds``
    indexes): init moves itself into the job's cgroup before anything else."""

    fd_indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AwaitIdMap:
    """Wait until the spawner has written a subuid/subgid range with newuidmap/newgidmap."""


@dataclass(frozen=True, slots=True)
class MakeRootPrivate:
    """Stop mount propagation to and from the host (``mount --make-rprivate /``)."""


@dataclass(frozen=True, slots=True)
class MountTmpfs:
    target: str
    size: int
    mode: int = 0o755
    noexec: bool = False
    readonly: bool = False
    optional: bool = False  # nothing to do when ``target`` does not exist


@dataclass(frozen=True, slots=True)
class MakeDir:
    """``mkdir -p`` then set mode and owner of the last component, never through a symlink:
    no component below ``beneath`` (the last one, when ``beneath`` is empty) may be one.
    Inside an image that matters before pivot_root, where an absolute or ``..`` symlink
    would lead to the host."""

    path: str
    mode: int = 0o755
    uid: int = -1
    gid: int = -1
    beneath: str = ""


@dataclass(frozen=True, slots=True)
class MountOverlay:
    lower: tuple[str, ...]
    upper: str
    work: str
    target: str


@dataclass(frozen=True, slots=True)
class BindMount:
    """Bind ``source`` on ``target`` (recursive), creating the target (a file or a dir), or
    skipping the op when the target is missing and ``create`` is ``"skip"``."""

    source: str
    target: str
    readonly: bool = False
    create: str = "dir"  # "dir" | "file" | "skip"
    devices: bool = False  # keep device nodes usable (only the sandbox's /dev entries)


@dataclass(frozen=True, slots=True)
class MountProc:
    target: str


@dataclass(frozen=True, slots=True)
class MountDevpts:
    target: str


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str
    path: str


@dataclass(frozen=True, slots=True)
class PivotRoot:
    """Make ``new_root`` the root and detach the old one (no trace of it remains)."""

    new_root: str


@dataclass(frozen=True, slots=True)
class Remount:
    """Re-apply flags to an existing mount point (bind remount: ro, nosuid, nodev...)."""

    target: str
    readonly: bool = True
    noexec: bool = False


@dataclass(frozen=True, slots=True)
class SetHostname:
    name: str


@dataclass(frozen=True, slots=True)
class LoopbackUp:
    """Bring ``lo`` up in the job's own network namespace."""


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Copy the memfd received as descriptor number ``fd_index`` of the go message to ``path``
    (never following a symlink), owned by uid/gid."""

    path: str
    fd_index: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class WriteText:
    """Replace ``path`` (whatever the image had there, a symlink included: it is unlinked,
    never followed) with a new file holding ``text``; its directory is made as `MakeDir`
    makes it, below ``beneath``."""

    path: str
    text: str
    mode: int = 0o644
    beneath: str = ""


@dataclass(frozen=True, slots=True)
class UnshareCgroupNamespace:
    """Enter a new cgroup namespace rooted at the job's cgroup."""


@dataclass(frozen=True, slots=True)
class Chdir:
    path: str


@dataclass(frozen=True, slots=True)
class SetRlimits:
    """``limits`` maps an RLIMIT name (``core``, ``nofile``...) to ``[soft, hard]``;
    -1 means unlimited."""

    limits: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SetIds:
    uid: int
    gid: int
    setgroups: bool = False  # False when /proc/self/setgroups says "deny"


@dataclass(frozen=True, slots=True)
class DropBoundingSet:
    """Empty the bounding and ambient sets and lock the securebits (before SetIds: it needs
    CAP_SETPCAP)."""


@dataclass(frozen=True, slots=True)
class ClearCapabilities:
    """Empty the effective, permitted and inheritable sets (after SetIds)."""


@dataclass(frozen=True, slots=True)
class NoNewPrivs:
    pass


@dataclass(frozen=True, slots=True)
class Seccomp:
    """Load the compiled filter (hex of the BPF program). Always the last step before exec."""

    bpf_hex: str


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start the job with posix_spawn (vfork + execve: no code of ours runs in the child):
    a new session (no controlling terminal, so no TIOCSTI into the caller's), the go
    message's descriptors ``stdio`` on 0, 1 and 2, every signal at its default and none
    blocked. Everything else (ids, capabilities, no_new_privs, seccomp, rlimits, cwd) the
    job inherits from init, which applied it to itself just before. ``argv[0]`` is looked
    up in the job's ``PATH`` when it has no slash."""

    argv: tuple[str, ...]
    env: dict[str, str]
    stdio: tuple[int, int, int] = (0, 1, 2)


Op = (JoinCgroup | SetIdMap | AwaitIdMap | MakeRootPrivate | MountTmpfs | MakeDir | MountOverlay
      | BindMount | MountProc | MountDevpts | Symlink | PivotRoot | Remount | SetHostname
      | LoopbackUp | WriteFile | WriteText | UnshareCgroupNamespace | Chdir | SetRlimits | SetIds
      | DropBoundingSet | ClearCapabilities | NoNewPrivs | Seccomp | Spawn)

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (
        JoinCgroup, SetIdMap, AwaitIdMap, MakeRootPrivate, MountTmpfs, MakeDir, MountOverlay,
        BindMount, MountProc, MountDevpts, Symlink, PivotRoot, Remount, SetHostname, LoopbackUp,
        WriteFile, WriteText, UnshareCgroupNamespace, Chdir, SetRlimits, SetIds, DropBoundingSet,
        ClearCapabilities, NoNewPrivs, Seccomp, Spawn)
}


def encode(ops: list[Op]) -> list[dict[str, Any]]:
    """Ops -> JSON-able dicts (``{"op": "MountProc", "target": ...}``). Shallow: op fields
    are plain values (dataclasses.asdict's deep copy cost milliseconds per job)."""
    return [{"op": type(op).__name__, **{name: getattr(op, name) for name in op.__slots__}}
            for op in ops]


def decode(items: list[dict[str, Any]]) -> list[Op]:
    """The inverse of `encode`; unknown op names are refused."""
    ops: list[Op] = []
    for item in items:
        data = dict(item)
        cls = _TYPES.get(data.pop("op", ""))
        if cls is None:
            raise ValueError(f"unknown set-up operation {item.get('op')!r}")
        for f in dataclasses.fields(cls):
            if isinstance(data.get(f.name), list) and f.name in ("lower", "argv", "stdio",
                                                                  "fd_indexes"):
                data[f.name] = tuple(data[f.name])
        ops.append(cls(**data))
    return ops


def describe(op: Op) -> str:
    """One line naming an op, for error messages and ``--dry-run`` plans."""
    fields = ", ".join(f"{k}={getattr(op, k)!r}" for k in op.__slots__
                       if k not in ("bpf_hex", "env"))
    return f"{type(op).__name__}({fields})"
