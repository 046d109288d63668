"""One job from go to verdict: output capture with a cap, CPU and wall watchdogs, the
verdict. The sandbox and its cgroup are handed in ready; this module never forks."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..cgroups import JobCgroup
from ..errors import SpecError
from ..jail import ops
from ..spec import Limits, Result, Status
from .spawner import InitHandle

OutputCallback = Callable[[str, bytes], Awaitable[None]]
_NCPU = os.cpu_count() or 1
MAX_STDIN_BUFFER = 64 << 20
STDIN_HIGH_WATER = 1 << 20  # `JobControl.send_stdin` waits while this much is unread


class JobControl:
    """A handle on one job from outside: cancel it, stream its stdin, see it start."""

    def __init__(self, *, stdin_stream: bool = False) -> None:
        self.stdin_stream = stdin_stream
        self.cancelled = False
        self.started = trio.Event()
        self.on_start: Callable[[], Awaitable[None]] | None = None
        self._kill: Callable[[], None] | None = None
        self._send, self.stdin_chunks = trio.open_memory_channel[bytes](float("inf"))
        self._buffered = 0
        self._drained = trio.Event()
        self._stdin_done = False  # the job closed its stdin, or ended

    def cancel(self) -> None:
        """Kill the job (or keep it from starting). Its result says ``cancelled``."""
        self.cancelled = True
        if self._kill is not None:
            self._kill()

    def feed_stdin(self, data: bytes, eof: bool = False) -> None:
        """Queue ``data`` for the job's stdin (a pipe when ``stdin_stream``); ``eof`` closes
        it. Raises `SpecError` past `MAX_STDIN_BUFFER` bytes not yet read by the job."""
        if not self.stdin_stream:
            raise SpecError("this job was not started with a stdin stream")
        if data:
            self._buffered += len(data)
            if self._buffered > MAX_STDIN_BUFFER:
                raise SpecError("too much stdin buffered for a job that does not read it")
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                self._send.send_nowait(data)
        if eof:
            self._send.close()

    async def send_stdin(self, data: bytes, eof: bool = False) -> None:
        """`feed_stdin`, but first wait while `STDIN_HIGH_WATER` bytes or more wait for the
        job (a stream of any length, at the pace the job reads it); what comes after the
        job stopped reading is dropped."""
        while data and self._buffered >= STDIN_HIGH_WATER and not self._stdin_done:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
        if self._stdin_done:
            data = b""
        self.feed_stdin(data, eof)

    def _consumed(self, n: int) -> None:
        self._buffered -= n
        if self._buffered < STDIN_HIGH_WATER:
            self._drained.set()

    def _stdin_closed(self) -> None:
        self._stdin_done = True
        self._drained.set()


@dataclass
class _State:
    limits: Limits
    fired: Status | None = None
    cancelled: bool = False
    init_cpu: float = 0.0  # CPU init used in the job's cgroup before the job started
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    total: int = 0
    truncated: bool = False

    def fire(self, status: Status, init: InitHandle) -> None:
        if self.fired is None:
            self.fired = status
        init.kill()


async def _capture(stream: trio.lowlevel.FdStream, name: str, state: _State,
                   init: InitHandle, on_output: OutputCallback | None) -> None:
    buf = state.stdout if name == "stdout" else state.stderr
    cap = state.limits.output or 0
    async with stream:
        while chunk := await stream.receive_some(65536):
            room = cap - state.total
            keep = chunk[: max(room, 0)]
            state.total += len(chunk)
            buf += keep
            if keep and on_output is not None:
                await on_output(name, bytes(keep))
            if state.total > cap:
                state.truncated = True
                state.fire(Status.OUTPUT_LIMIT, init)


async def _feed_stdin(stream: trio.lowlevel.FdStream, control: JobControl) -> None:
    async with stream:
        try:
            async for chunk in control.stdin_chunks:
                await stream.send_all(chunk)
                control._consumed(len(chunk))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the job closed its stdin: drop the rest
        finally:
            control._stdin_closed()


async def _watchdog(cgroup: JobCgroup, state: _State, init: InitHandle) -> None:
    """Kill the whole job when its CPU time passes the limit or the OOM killer fires in its
    cgroup (a judge wants one verdict, not a job running on with a process missing)."""
    limit = state.limits.time or 0.0
    used = 0.0  # the job has just started: the first look is due when it could be over
    while True:
        # Sleep until the job could have used what is left, on every CPU at once.
        await trio.sleep(min(max((limit - used) / _NCPU, 0.002), 0.1))
        used = cgroup.cpu_time() - state.init_cpu
        cgroup.sample()
        if used > limit:
            state.fire(Status.TIME_LIMIT, init)
            return
        if cgroup.oom_killed():
            state.fire(Status.MEMORY_LIMIT, init)
            return


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def run(init: InitHandle, cgroup: JobCgroup, limits: Limits, go_ops: list[ops.Op],
              launch_ops: list[ops.Op], files: list[bytes], stdin: bytes | None,
              on_output: OutputCallback | None = None, t_start: float = 0.0,
              control: JobControl | None = None) -> Result:
    """Hand the job to a ready sandbox ``init`` (already in ``cgroup``) and see it through.
    Always returns a `Result`; the caller removes the cgroup and closes ``init``."""
    control = control or JobControl()
    state = _State(limits)

    def kill() -> None:
        state.cancelled = True
        init.kill()

    control._kill = kill
    if control.cancelled:
        kill()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    stdin_writer: trio.lowlevel.FdStream | None = None
    if control.stdin_stream:
        stdin_fd, w = os.pipe2(os.O_CLOEXEC)
        stdin_writer = trio.lowlevel.FdStream(w)
    elif stdin is not None:
        stdin_fd = _memfd("stdin", stdin)
    else:
        stdin_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    passed = [stdin_fd, out_w, err_w]
    streams = [trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)]
    exited: dict[str, object] | None = None
    failure: dict[str, object] | None = None
    started_at = ended_at = 0.0
    try:
        try:
            passed += [_memfd(f"file{i}", data) for i, data in enumerate(files)]
            await init.go(go_ops, launch_ops, passed)
        finally:
            for fd in passed:
                os.close(fd)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_capture, streams[0], "stdout", state, init, on_output)
            nursery.start_soon(_capture, streams[1], "stderr", state, init, on_output)
            if stdin_writer is not None:
                nursery.start_soon(_feed_stdin, stdin_writer, control)
            event = await init.event()
            local_start = time.monotonic()
            if event is not None and event.get("event") == "started":
                started_at = float(event.get("time", local_start))
                state.init_cpu = float(event.get("init_cpu", 0.0))
                control.started.set()
                if control.on_start is not None:
                    await control.on_start()
                async with trio.open_nursery() as watching:
                    watching.start_soon(_watchdog, cgroup, state, init)
                    with trio.move_on_after(limits.wall_time or 0) as wall:
                        event = await init.event()
                    if wall.cancelled_caught:
                        state.fire(Status.TIME_LIMIT, init)
                    if event is not None and event.get("event") == "exited":
                        exited = event
                        ended_at = float(event.get("time", time.monotonic()))
                    else:  # init was killed (a limit, a cancel, the OOM killer)
                        await init.wait_dead()
                    watching.cancel_scope.cancel()
                # init exits right after "exited", so the kernel kills any process the job
                # left behind and the output pipes reach EOF; the caller destroys the
                # sandbox (namespace teardown takes a while) after the result is out.
                if not ended_at:
                    ended_at = time.monotonic() - local_start + started_at
            elif event is None and (state.fired is not None or state.cancelled):
                # We killed it (output cap, cancel) before its "started" reached us: the job
                # did run; the verdict comes from what fired.
                await init.wait_dead()
                started_at, ended_at = local_start, time.monotonic()
            else:
                failure = event or {"event": "failed", "step": "init",
                                    "message": "sandbox init died before the job started"}
                init.kill()
                await init.wait_dead()
            control.stdin_chunks.close()
    finally:
        for s in [*streams, *([stdin_writer] if stdin_writer else [])]:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await s.aclose()
    stats = cgroup.stats()
    measured = _Measured(cpu_time=max(stats.cpu_time - state.init_cpu, 0.0),
                         wall_time=max(ended_at - started_at, 0.0),
                         memory=stats.memory_peak, stdout=bytes(state.stdout),
                         stderr=bytes(state.stderr),
                         setup_time=max(started_at - t_start, 0.0) if t_start else 0.0)
    if state.cancelled and state.fired is None:
        return measured.result(Status.SIGNALED, signal=signal.SIGKILL, message="cancelled")
    if failure is not None:
        return _failed_start(failure, measured)
    return _verdict(state, measured, stats.oom_killed, exited)


@dataclass(frozen=True)
class _Measured:
    cpu_time: float
    wall_time: float
    memory: int
    stdout: bytes
    stderr: bytes
    setup_time: float

    def result(self, status: Status, *, exit_code: int | None = None, signal: int | None = None,
               message: str = "", note: bytes = b"") -> Result:
        return Result(status=status, exit_code=exit_code, signal=signal, cpu_time=self.cpu_time,
                      wall_time=self.wall_time, memory=self.memory, stdout=self.stdout,
                      stderr=self.stderr + note, setup_time=self.setup_time, message=message)


def _verdict(state: _State, m: _Measured, oom: bool, exited: dict[str, object] | None) -> Result:
    """A limit that fired wins over the signal it caused; then OOM; then CPU time over the
    limit (a job may finish just past it); then the wait status."""
    exit_code: int | None = None
    sig: int | None = None
    if exited is not None:
        status = int(str(exited["status"]))
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
        else:
            exit_code = os.WEXITSTATUS(status)
    elif state.fired is not None or oom:
        sig = signal.SIGKILL  # we (or the OOM killer) killed init, and with it the job
    else:
        return m.result(Status.INTERNAL_ERROR, message="sandbox init died unexpectedly")
    if state.fired is not None:
        verdict = state.fired
    elif oom:
        verdict = Status.MEMORY_LIMIT
    elif state.limits.time is not None and m.cpu_time > state.limits.time:
        verdict = Status.TIME_LIMIT
    elif sig is not None:
        verdict = Status.SIGNALED
    elif exit_code:
        verdict = Status.NONZERO_EXIT
    else:
        verdict = Status.OK
    return m.result(verdict, exit_code=exit_code, signal=sig)


def _failed_start(failure: dict[str, object], m: _Measured) -> Result:
    """The program never started. A missing or non-executable command is the program's
    failure, reported as a shell would (127 / 126); anything else is ours."""
    err = int(str(failure.get("errno") or 0))
    message = str(failure.get("message", "set-up failed"))
    argv0 = failure.get("exec")
    if failure.get("step") == "launch" and argv0:
        if err in (errno.ENOENT, errno.ENOTDIR):
            text = f"{argv0}: command not found"
            return m.result(Status.NONZERO_EXIT, exit_code=127, message=text,
                            note=f"sandbox: {text}\n".encode())
        if err in (errno.EACCES, errno.ENOEXEC, errno.EPERM, errno.EISDIR):
            text = f"{argv0}: cannot execute: {os.strerror(err)}"
            return m.result(Status.NONZERO_EXIT, exit_code=126, message=text,
                            note=f"sandbox: {text}\n".encode())
    return m.result(Status.INTERNAL_ERROR, message=f"{failure.get('step')}: {message}")
