"""The trio side of the spawner and of each sandbox's init.

`Spawner` starts ``sandbox._spawner`` once (from the main thread, so that its parent-death
signal is tied to the supervisor's life, not to a worker thread's) and asks it for
sandboxes. `InitHandle` is one sandbox: its pidfd (to kill it and to learn that it and
everything in its pid namespace is gone) and its socket (events in, the go message out).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ..config import PACKAGE_DIR, spawner_python
from ..errors import SandboxError, SetupError
from ..jail import ops
from ..jail.wire import MAX_FDS, MAX_MESSAGE

# A go message is one SOCK_SEQPACKET datagram, bounded by the socket's send buffer (about
# 208 KiB by default), not only by MAX_MESSAGE.
MAX_GO_MESSAGE = 192 * 1024


async def _recv(sock: trio.socket.SocketType) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, anc, _flags, _ = await sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(
        MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


async def _send(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    await sock.sendmsg([data], anc)


class Closeable(Protocol):
    def close(self) -> None: ...


class InitHandle:
    """A sandbox's init process, as the supervisor sees it."""

    def __init__(self, pid: int, pidfd: int, sock: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.ready_at = 0.0
        self._dead = False
        self._closed = False
        self._held: list[Closeable] = []

    def hold(self, resource: Closeable) -> None:
        """Keep ``resource`` (e.g. a lease on the image's layers) until `close`."""
        self._held.append(resource)

    async def event(self) -> dict[str, Any] | None:
        """The next event from init, or None once it has hung up."""
        try:
            msg, fds = await _recv(self.sock)
        except (OSError, ValueError):
            return None
        for fd in fds:
            os.close(fd)
        return msg

    async def wait_ready(self) -> None:
        msg = await self.event()
        if msg is None or msg.get("event") != "ready":
            raise _setup_error(msg)
        self.ready_at = float(msg.get("time", 0.0))

    async def go(self, go_ops: list[ops.Op], launch_ops: list[ops.Op], fds: list[int]) -> None:
        """Send the job (one datagram; a large command line travels in a sealed memfd
        whose descriptor follows the others)."""
        data = _encode({"go": ops.encode(go_ops), "launch": ops.encode(launch_ops)})
        if len(data) <= MAX_GO_MESSAGE:
            await _send(self.sock, data, fds)
            return
        fd = os.memfd_create("go", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            await _send(self.sock, _encode({"go_fd": len(fds), "size": len(data)}), [*fds, fd])
        finally:
            os.close(fd)

    def alive(self) -> bool:
        import select  # noqa: PLC0415

        if self._dead:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if poller.poll(0):
            self._dead = True
        return not self._dead

    def kill(self) -> None:
        """SIGKILL init; the kernel then kills everything else in its pid namespace."""
        if not self._dead:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def wait_dead(self) -> None:
        """Return once init has exited, which (as the pid namespace's init) means every
        process of the job is gone too."""
        if not self._dead:
            await trio.lowlevel.wait_readable(self.pidfd)
            self._dead = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()
            os.close(self.pidfd)
            for resource in self._held:
                resource.close()

    async def discard(self) -> None:
        """Kill, wait for and release an unused sandbox."""
        self.kill()
        with trio.CancelScope(shield=True):
            await self.wait_dead()
        self.close()


def _setup_error(msg: dict[str, Any] | None) -> SandboxError:
    if msg is None:
        return SandboxError("sandbox init died during set-up")
    if msg.get("event") == "failed":
        return SetupError(str(msg.get("step", "?")), int(msg.get("errno", 0)),
                          str(msg.get("message", "")))
    return SandboxError(f"unexpected event from sandbox init: {msg.get('event')!r}")


class Spawner:
    """One ``sandbox._spawner`` process and the socket to it."""

    def __init__(self, on_start: Callable[[int], None] | None = None) -> None:
        self._on_start = on_start  # given the new spawner's pid (cgroups: `Manager.adopt`)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: trio.socket.SocketType | None = None
        self._lock = trio.Lock()
        self._next_id = 0
        self._known_plans: set[str] = set()
        self._started = False

    def start(self) -> None:
        """Start the spawner (synchronously, from the calling thread: call it from the
        main thread)."""
        self._started = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from sandbox._spawner import main; main(int(sys.argv[2]))")
        # A minimal environment: a sandbox's init is a fork of the spawner, so this is what
        # /proc/1/environ would hold (were it readable, which it is not).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            self._proc = subprocess.Popen(
                [spawner_python(), "-I", "-S", "-c", code, str(PACKAGE_DIR.parent),
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), env=env, close_fds=True)
        finally:
            theirs.close()
        if self._on_start is not None:
            try:
                self._on_start(self._proc.pid)
            except BaseException:
                ours.close()
                self._proc.kill()
                self._proc.wait()
                self._proc = None
                raise
        self._sock = trio.socket.from_stdlib_socket(ours)

    async def spawn(self, plan_id: str, prepare: list[dict[str, Any]], flags: int,
                    idmap: dict[str, object] | None, fds: list[int]) -> InitHandle:
        """Clone a new sandbox init that runs ``prepare`` (encoded ops, known to the spawner
        by ``plan_id`` after the first time) and inherits ``fds``; returns once it is cloned
        (`InitHandle.wait_ready` waits for the set-up)."""
        async with self._lock:
            self.ensure_running()
            assert self._sock is not None
            self._next_id += 1
            request: dict[str, Any] = {"id": self._next_id, "op": "spawn", "flags": flags,
                                       "plan_id": plan_id, "idmap": idmap}
            if plan_id not in self._known_plans:
                request["prepare"] = prepare
            try:
                await _send(self._sock, _encode(request), fds)
                self._known_plans.add(plan_id)
                reply, fds = await _recv(self._sock)
            except OSError as e:
                raise SandboxError(f"lost the spawner: {e.strerror or e}") from None
        if reply is None:
            raise SandboxError("the spawner exited unexpectedly")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"cannot create a sandbox: {reply['error']}")
        if len(fds) != 2:  # e.g. we were out of descriptors when they arrived
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"cannot create a sandbox: {len(fds)} of its 2 descriptors "
                               "arrived (too many open files?)")
        pidfd, sock_fd = fds
        return InitHandle(int(reply["pid"]), pidfd, socket.socket(fileno=sock_fd))

    def ensure_running(self) -> None:
        """Start a new spawner in place of a dead one (a daemon outlives its spawner: it was
        killed, and its sandboxes died with it). Call it from the main thread, as `start`."""
        if not self._started:
            raise SandboxError("spawner is not running")
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._proc = None
        self._known_plans.clear()  # the new spawner has seen no plan yet
        self.start()

    def close(self) -> None:
        self._started = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
