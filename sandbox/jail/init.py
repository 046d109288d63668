"""The life of a sandbox's init: pid 1 of the job's namespaces, a fork of the spawner.

It applies the ``prepare`` ops, reports ``ready`` and waits (a warm sandbox waits here).
On ``go`` it applies the ``go`` ops, forks the job, which applies the ``launch`` ops and
execs; init reports ``started`` (or ``failed`` with the op that failed), reaps everything
in its namespace, reports the job's wait status as ``exited`` and exits, which makes the
kernel kill whatever the job left behind. Stdlib only.

init never runs job code, installs no signal handlers (so, as a pid namespace's init, it
ignores every signal the job may send it) and is not dumpable (the job cannot read its
/proc entries, environment included).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import time
from typing import NoReturn

from .. import linux
from . import wire
from .apply import Context, apply
from .ops import Exec, Op, decode, describe


def _failure(step: str, index: int, op: Op | None, exc: BaseException) -> dict[str, object]:
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return {"event": "failed", "step": step, "index": index,
            "op": describe(op) if op is not None else "", "errno": err,
            "exec": op.argv[0] if isinstance(op, Exec) else None,
            "message": f"{type(op).__name__ if op else step}: {detail}"}


def _close_all_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            linux.close_range(low, fd - 1)
        low = fd + 1
    linux.close_range(low)


def run(sock: socket.socket, prepare: list[Op], lifeline: tuple[int, int],
        idmap_fd: int) -> NoReturn:
    """Entry point in the cloned child. Never returns. ``lifeline`` is a pipe whose write
    end only the spawner keeps open."""
    code = 1
    try:
        os.close(lifeline[1])
        code = _run(sock, prepare, lifeline[0], idmap_fd)
    except BaseException as exc:  # noqa: BLE001 - report anything, then die
        with contextlib.suppress(OSError):
            wire.send(sock, _failure("init", -1, None, exc))
    os._exit(code)


def _run(sock: socket.socket, prepare: list[Op], lifeline: int, idmap_fd: int) -> int:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # The spawner may have died before PDEATHSIG was armed: then the lifeline has hung up.
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    if poller.poll(0):
        return 1
    devnull = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.close(devnull)
    _close_all_except({sock.fileno(), idmap_fd})

    ctx = Context(idmap_fd=idmap_fd)
    for i, op in enumerate(prepare):
        try:
            apply(op, ctx)
        except BaseException as exc:  # noqa: BLE001
            wire.send(sock, _failure("prepare", i, op, exc))
            return 1
    if idmap_fd >= 0:
        os.close(idmap_fd)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    wire.send(sock, {"event": "ready", "time": time.monotonic()})

    msg, fds = wire.recv(sock)
    if msg is None:  # the supervisor let this sandbox go unused
        return 0
    go, launch = decode(msg["go"]), decode(msg["launch"])
    ctx = Context(fds=fds)
    for i, op in enumerate(go):
        try:
            apply(op, ctx)
        except BaseException as exc:  # noqa: BLE001
            wire.send(sock, _failure("go", i, op, exc))
            return 1

    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _launch(launch, Context(fds=fds, keep_fd=err_w), err_w)
    os.close(err_w)
    for fd in fds:
        os.close(fd)
    report = b""
    while chunk := os.read(err_r, 65536):
        report += chunk
    os.close(err_r)
    started = time.monotonic()
    if report:
        os.waitpid(pid, 0)
        wire.send(sock, json.loads(report))
        return 1
    wire.send(sock, {"event": "started", "time": started})

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


def _launch(ops: list[Op], ctx: Context, err_w: int) -> NoReturn:
    """In the job process: apply the launch ops; the last one execs."""
    index, op = -1, None
    try:
        for index, op in enumerate(ops):  # noqa: B007 - index and op name the failed step
            apply(op, ctx)
        raise OSError(errno.EINVAL, "the launch plan did not exec")
    except BaseException as exc:  # noqa: BLE001
        failure = _failure("launch", index, op, exc)
        try:
            os.write(err_w, json.dumps(failure).encode())
        finally:
            os._exit(127)
