"""Thin, typed, errno-correct wrappers of the Linux calls Python's stdlib lacks.

Stdlib only: the spawner and the child side import this module, and nothing heavy may come
with it. Every wrapper raises `OSError` with the real errno and the operation in its message.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)
# PyDLL keeps the GIL held across the call: `clone` must not release it, so that the child
# resumes with a consistent interpreter state before PyOS_AfterFork_Child runs.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc_gil.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]

_MACHINE = os.uname().machine
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"clone": 56, "pivot_root": 155, "seccomp": 317, "capset": 126,
               "close_range": 436},
    "aarch64": {"clone": 220, "pivot_root": 41, "seccomp": 277, "capset": 91,
                "close_range": 436},
}
if _MACHINE not in _SYSCALLS:  # pragma: no cover - we only ship these two
    raise ImportError(f"unsupported architecture {_MACHINE}")
NR = _SYSCALLS[_MACHINE]

# clone(2) / unshare(2) flags
CLONE_NEWTIME = 0x00000080
CLONE_PIDFD = 0x00001000
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {
    "user": CLONE_NEWUSER, "mnt": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "cgroup": CLONE_NEWCGROUP,
}

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT | _LOCKED | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE | _LOCKED
SECUREBITS_LOCKDOWN = 0x01 | 0x02 | 0x20 | 0x40 | 0x80

_SIGCHLD = 17


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def clone(flags: int) -> tuple[int, int]:
    """fork(2) with namespace flags; returns ``(pid, pidfd)`` in the parent, ``(0, -1)`` in
    the child. Only safe from a single-threaded process (the spawner)."""
    pidfd = ctypes.c_int(-1)
    py = ctypes.pythonapi
    py.PyOS_BeforeFork()
    pid = _libc_gil.syscall(NR["clone"], ctypes.c_ulong(flags | CLONE_PIDFD | _SIGCHLD),
                            ctypes.c_ulong(0), ctypes.byref(pidfd), ctypes.c_ulong(0),
                            ctypes.c_ulong(0))
    if pid == 0:
        py.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    py.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid, pidfd.value


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(NR["pivot_root"], new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def argv_area() -> tuple[int, int]:
    """Where this process's command line lives in its memory (what /proc/PID/cmdline
    shows): ``(arg_start, arg_end)`` from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)


def retitle(area: tuple[int, int], title: bytes) -> None:
    """Overwrite the command line in ``area`` (from `argv_area`, inherited across fork)
    with ``title`` and set the thread name to it: what other processes see of us. Safe in
    Python, which copied its argv at start-up and never reads the original again."""
    start, end = area
    if end - start > len(title) + 1:
        ctypes.memset(start, 0, end - start)
        ctypes.memmove(start, title, len(title))
        # A last byte that is not NUL tells the kernel the title was rewritten
        # (setproctitle): it then shows the area up to the first NUL, the title alone.
        ctypes.memset(end - 1, 1, 1)
    name = ctypes.create_string_buffer(title[:15])  # NUL-terminated, alive across the call
    prctl(PR_SET_NAME, ctypes.addressof(name))


def close_range(first: int, last: int = 0xFFFFFFFF, *, cloexec: bool = False) -> None:
    """Close (or, with ``cloexec``, mark close-on-exec) every descriptor from ``first`` to
    ``last`` inclusive."""
    flags = 4 if cloexec else 0  # CLOSE_RANGE_CLOEXEC
    if _libc.syscall(NR["close_range"], ctypes.c_uint(first), ctypes.c_uint(last),
                     ctypes.c_uint(flags)) < 0:
        if cloexec:  # kernels before 5.11
            for fd in range(first, min(last, 1 << 16) + 1):
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    continue
        else:  # kernels before 5.9
            os.closerange(first, min(last, 1 << 20) + 1)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


def drop_bounding_set() -> None:
    """Empty the bounding and ambient sets and lock the securebits so that no execve (of a
    setuid-root or file-capability binary) can ever give capabilities back. Needs
    CAP_SETPCAP, so it runs before the uid drop."""
    last = 63
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            if ctypes.get_errno() == errno.EINVAL:  # past cap_last_cap
                break
            _check(-1, f"drop capability {cap} from the bounding set")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    _check(_libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKDOWN, 0, 0, 0), "set securebits")


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (dropping needs no privilege)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.syscall(NR["capset"], ctypes.byref(header), ctypes.byref(data)), "capset")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def load_seccomp(bpf: bytes) -> None:
    """Install a classic-BPF seccomp filter (as exported by libseccomp)."""
    if not bpf or len(bpf) % 8:
        raise OSError(errno.EINVAL, "seccomp: malformed BPF program")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    # seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)
    _check(_libc.syscall(NR["seccomp"], ctypes.c_uint(1), ctypes.c_uint(0),
                         ctypes.byref(prog)), "seccomp")


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), 0x8913, ifreq))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1 | 0x40))


def write_file(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
