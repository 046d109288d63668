"""The life of a sandbox's init: pid 1 of the job's namespaces, a fork of the spawner.

It applies the ``prepare`` ops, reports ``ready`` and waits (a warm sandbox waits here).
On ``go`` it applies the ``go`` ops, then the ``launch`` ops to itself (uid drop, empty
capability sets, no_new_privs, seccomp) and spawns the job with posix_spawn, so the job
inherits all of it and no code of ours runs in the job's process. init reports ``started``
(or ``failed`` with the op that failed), reaps everything in its namespace, reports the
job's wait status as ``exited`` and exits, which makes the kernel kill whatever the job left
behind. Stdlib only.

init never runs job code, keeps every signal at its default disposition (so, as a pid
namespace's init, it ignores every signal the job may send it), and is not dumpable (the job
cannot read its /proc entries, environment included).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import signal
import socket
import time
from typing import NoReturn

from .. import linux
from . import wire
from .apply import Context, apply
from .ops import Op, Spawn, decode, describe

_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


def not_at_default() -> tuple[int, ...]:
    """The signals whose disposition is not SIG_DFL here. The spawner asks once; each init
    (a fork, with the same table) resets just those: the job inherits ignored signals."""
    return tuple(s for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_DFL)


def _failure(step: str, index: int, op: Op | None, exc: BaseException) -> dict[str, object]:
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return {"event": "failed", "step": step, "index": index,
            "op": describe(op) if op is not None else "", "errno": err,
            "exec": op.argv[0] if isinstance(op, Spawn) else None,
            "message": f"{type(op).__name__ if op else step}: {detail}"}


def _close_all_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            linux.close_range(low, fd - 1)
        low = fd + 1
    linux.close_range(low)


def _orphaned(lifeline: int) -> bool:
    """True once the spawner is gone (the lifeline's write end closed)."""
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    return bool(poller.poll(0))


def run(sock: socket.socket, prepare: list[Op], lifeline: tuple[int, int],
        idmap_fd: int, fds: list[int], argv_area: tuple[int, int],
        reset_signals: tuple[int, ...]) -> NoReturn:
    """Entry point in the cloned child. Never returns. ``lifeline`` is a pipe whose write
    end only the spawner keeps open; ``argv_area`` is where the spawner's command line
    (host paths) lies in memory, overwritten here: the job can read init's.
    ``reset_signals``: `not_at_default` as the spawner found it."""
    gc.disable()  # a collection would write to (and so copy) the spawner's shared pages
    code = 1
    try:
        os.close(lifeline[1])
        linux.retitle(argv_area, b"sandbox-init")
        code = _run(sock, prepare, lifeline[0], idmap_fd, fds, reset_signals)
    except BaseException as exc:  # noqa: BLE001 - report anything, then die
        with contextlib.suppress(OSError):
            wire.send(sock, _failure("init", -1, None, exc))
    os._exit(code)


def _run(sock: socket.socket, prepare: list[Op], lifeline: int, idmap_fd: int,
         passed: list[int], reset_signals: tuple[int, ...]) -> int:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    # Every signal to its default (the spawner ignores SIGCHLD and SIGINT; Python ignores
    # SIGPIPE and SIGXFSZ; a disposition ignored by whoever started the daemon survives
    # exec). Python's table knows each one: only those not at SIG_DFL cost a syscall.
    for sig in reset_signals:
        signal.signal(sig, signal.SIG_DFL)
    # The spawner may have died before PDEATHSIG was armed: then the lifeline has hung up.
    if _orphaned(lifeline):
        return 1
    devnull = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.close(devnull)
    _close_all_except({sock.fileno(), idmap_fd, lifeline, *passed})

    ctx = Context(fds=passed, idmap_fd=idmap_fd)
    for i, op in enumerate(prepare):
        try:
            apply(op, ctx)
        except BaseException as exc:  # noqa: BLE001
            wire.send(sock, _failure("prepare", i, op, exc))
            return 1
    for fd in (idmap_fd, *passed):
        if fd >= 0:
            os.close(fd)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    wire.send(sock, {"event": "ready", "time": time.monotonic()})

    msg, fds = wire.recv(sock)
    if msg is None:  # the supervisor let this sandbox go unused
        return 0
    if "go_fd" in msg:  # a large command line came in a sealed memfd, after the others
        index = int(msg["go_fd"])
        msg = wire.decode(os.pread(fds[index], int(msg["size"]), 0))
        os.close(fds.pop(index))
    go, launch = decode(msg["go"]), decode(msg["launch"])
    ctx = Context(fds=fds)
    pid = None
    for step, steps in (("go", go), ("launch", launch)):
        for i, op in enumerate(steps):
            try:
                pid = apply(op, ctx)
            except BaseException as exc:  # noqa: BLE001
                wire.send(sock, _failure(step, i, op, exc))
                return 1
    started = time.monotonic()
    for fd in fds:
        os.close(fd)
    if pid is not None and _orphaned(lifeline):  # the spawner died while SetIds re-armed
        os.kill(pid, signal.SIGKILL)             # the parent-death signal
        return 1
    if pid is None:
        wire.send(sock, _failure("launch", -1, None, OSError(errno.EINVAL, "nothing spawned")))
        return 1
    # We joined the job's cgroup first thing: the CPU we used is ours, not the job's, and
    # is subtracted from the cgroup's CPU time.
    wire.send(sock, {"event": "started", "time": started, "init_cpu": time.thread_time()})

    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:  # pragma: no cover - the job is always our child
            return 1
        if reaped == pid:
            break
    ended = time.monotonic()
    wire.send(sock, {"event": "exited", "status": status, "time": ended,
                     "wall_time": ended - started})
    return 0
