"""Apply one set-up operation in the child. Small and flat on purpose: audit this file.

Stdlib only (runs in processes forked from the spawner). Each branch does one thing; errors
propagate as OSError and the caller reports the op that failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import assert_never

from .. import linux
from .ops import (
    AwaitIdMap,
    BindMount,
    Chdir,
    ClearCapabilities,
    DropBoundingSet,
    JoinCgroup,
    LoopbackUp,
    MakeDir,
    MakeRootPrivate,
    MountDevpts,
    MountOverlay,
    MountProc,
    MountTmpfs,
    NoNewPrivs,
    Op,
    PivotRoot,
    Remount,
    Seccomp,
    SetHostname,
    SetIdMap,
    SetIds,
    SetRlimits,
    Spawn,
    Symlink,
    UnshareCgroupNamespace,
    WriteFile,
    WriteText,
)

_NOSUID_NODEV = linux.MS_NOSUID | linux.MS_NODEV
_RLIMITS = {
    "core": resource.RLIMIT_CORE, "cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE, "stack": resource.RLIMIT_STACK,
    "nproc": resource.RLIMIT_NPROC, "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE, "as": resource.RLIMIT_AS,
}


@dataclass(slots=True)
class Context:
    """What an op may need besides itself: the go message's descriptors and the pipe on
    which the spawner confirms the id maps."""

    fds: Sequence[int] = ()
    idmap_fd: int = -1


def apply(op: Op, ctx: Context) -> int | None:
    """Carry out ``op``; `Spawn` returns the job's pid."""
    fds = ctx.fds
    match op:
        case JoinCgroup(fd_indexes):
            for index in fd_indexes:
                os.write(fds[index], b"0")
        case SetIdMap(uid_in, uid_out, gid_in, gid_out):
            linux.write_file("/proc/self/setgroups", "deny")
            linux.write_file("/proc/self/uid_map", f"{uid_in} {uid_out} 1\n")
            linux.write_file("/proc/self/gid_map", f"{gid_in} {gid_out} 1\n")
        case AwaitIdMap():
            if os.read(ctx.idmap_fd, 1) != b"1":
                raise OSError(errno.EPERM, "the id maps were not written (newuidmap failed)")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        case MakeRootPrivate():
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        case MountTmpfs(target, size, mode, noexec, readonly, optional):
            if optional and not os.path.isdir(target):
                return None
            flags = (_NOSUID_NODEV | (linux.MS_NOEXEC if noexec else 0)
                     | (linux.MS_RDONLY if readonly else 0))
            linux.mount("tmpfs", target, "tmpfs", flags, f"size={size},mode={mode:o}")
        case MakeDir(path, mode, uid, gid, beneath):
            fd = _make_dirs(path, beneath)
            try:
                os.fchmod(fd, mode)
                if uid >= 0 or gid >= 0:
                    os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        case MountOverlay(lower, upper, work, target):
            # Named by descriptor: the job reads the options in /proc/self/mountinfo, and
            # host paths (home, user name, store) are none of its business.
            dirs: list[int] = []
            try:
                for path in (*lower, upper, work):
                    dirs.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                names = [f"/proc/self/fd/{fd}" for fd in dirs]
                data = (f"lowerdir={':'.join(names[:-2])},upperdir={names[-2]},"
                        f"workdir={names[-1]},userxattr,xino=on")
                linux.mount("overlay", target, "overlay", _NOSUID_NODEV, data)
            finally:
                for fd in dirs:
                    os.close(fd)
        case BindMount(source, target, readonly, create, devices):
            if not os.path.lexists(target):
                if create == "skip":
                    return None
                if create == "file":
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
                else:
                    os.makedirs(target, exist_ok=True)
            linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
            flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | _kept_flags(target)
            if readonly:
                flags |= linux.MS_RDONLY
            if not devices:
                flags |= linux.MS_NODEV
            linux.mount(None, target, None, flags)
        case MountProc(target):
            linux.mount("proc", target, "proc", _NOSUID_NODEV | linux.MS_NOEXEC)
        case MountDevpts(target):
            linux.mount("devpts", target, "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                        "newinstance,ptmxmode=0666,mode=0620")
        case Symlink(target, path):
            os.symlink(target, path)
        case PivotRoot(new_root):
            os.chdir(new_root)
            linux.pivot_root(".", ".")
            linux.umount2(".", linux.MNT_DETACH)
            os.chdir("/")
        case Remount(target, readonly, noexec):
            flags = linux.MS_BIND | linux.MS_REMOUNT | _NOSUID_NODEV | _kept_flags(target)
            flags |= (linux.MS_RDONLY if readonly else 0) | (linux.MS_NOEXEC if noexec else 0)
            linux.mount(None, target, None, flags)
        case SetHostname(name):
            import socket  # noqa: PLC0415 - only the init process needs it

            socket.sethostname(name)
        case LoopbackUp():
            linux.loopback_up()
        case WriteFile(path, fd_index, mode, uid, gid):
            dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, mode)
            try:
                src = fds[fd_index]
                size, offset = os.fstat(src).st_size, 0
                while offset < size:  # in the kernel, from the memfd to the file
                    sent = os.sendfile(dst, src, offset, size - offset)
                    if not sent:
                        break
                    offset += sent
                os.fchmod(dst, mode)
                os.fchown(dst, uid, gid)
            finally:
                os.close(dst)
        case WriteText(path, text, mode, beneath):
            directory = _make_dirs(os.path.dirname(path), beneath)
            name = os.path.basename(path)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=directory)
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=directory)
                try:
                    os.write(fd, text.encode())
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            finally:
                os.close(directory)
        case UnshareCgroupNamespace():
            linux.unshare(linux.CLONE_NEWCGROUP)
        case Chdir(path):
            os.chdir(path)
        case SetRlimits(limits):
            for name, (soft, hard) in limits.items():
                inf = resource.RLIM_INFINITY
                resource.setrlimit(_RLIMITS[name], (inf if soft < 0 else soft,
                                                    inf if hard < 0 else hard))
        case SetIds(uid, gid, setgroups):
            if setgroups:
                os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            # A change of credentials clears the parent-death signal: arm it again (init
            # checks its lifeline afterwards, in case the spawner died in between).
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        case DropBoundingSet():
            linux.drop_bounding_set()
        case ClearCapabilities():
            linux.clear_capabilities()
        case NoNewPrivs():
            linux.set_no_new_privs()
        case Seccomp(bpf_hex):
            linux.load_seccomp(bytes.fromhex(bpf_hex))
        case Spawn(argv, env, stdio):
            linux.close_range(3, cloexec=True)  # nothing of init's reaches the job
            return os.posix_spawn(
                _which(argv[0], env.get("PATH", "/usr/bin:/bin")), list(argv), env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fds[index], target)
                              for target, index in enumerate(stdio)],
                setsid=True, setsigmask=(), setsigdef=_ALL_SIGNALS)
        case _:
            assert_never(op)
    return None


def _make_dirs(path: str, beneath: str) -> int:
    """``mkdir -p path`` and return a descriptor of it, walking each component below
    ``beneath`` (or the last one) with O_NOFOLLOW: a symlink there is an error, never
    followed."""
    path = path.rstrip("/") or "/"
    base = (beneath.rstrip("/") or "/") if beneath else os.path.dirname(path)
    if not beneath:
        os.makedirs(base, exist_ok=True)
    prefix = base.rstrip("/") + "/"
    if path != base and not path.startswith(prefix):
        raise OSError(errno.EINVAL, f"{path} is not below {base}")
    rel = path[len(prefix):] if path != base else ""
    if ".." in rel.split("/"):
        raise OSError(errno.EINVAL, f"{path} is not below {base}")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in (p for p in rel.split("/") if p):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(e.errno, f"{path}: {part!r} is a symlink or not a directory "
                              "in the image") from None
            raise
        finally:
            os.close(fd)
        fd = child
    return fd


def _kept_flags(target: str) -> int:
    """The flags a bind remount must keep: a mount inherited from a more privileged user
    namespace has its ro/nosuid/nodev/noexec/atime flags locked, and dropping one is EPERM."""
    have = os.statvfs(target).f_flag
    flags = 0
    for st_bit, ms_bit in ((os.ST_RDONLY, linux.MS_RDONLY), (os.ST_NOSUID, linux.MS_NOSUID),
                           (os.ST_NODEV, linux.MS_NODEV), (os.ST_NOEXEC, linux.MS_NOEXEC),
                           (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048),
                           (os.ST_RELATIME, 1 << 21)):
        if have & st_bit:
            flags |= ms_bit
    return flags


_ALL_SIGNALS = tuple(s for s in signal.valid_signals()
                     if s not in (signal.SIGKILL, signal.SIGSTOP))


def _which(name: str, path: str) -> str:
    """Resolve ``name`` like a shell does, in the job's PATH (posix_spawnp would search
    init's own); the errno of the most telling failure wins."""
    if "/" in name:
        return name
    denied: OSError | None = None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = PermissionError(errno.EACCES, f"{name}: permission denied")
    raise denied or FileNotFoundError(errno.ENOENT, f"{name}: command not found")
