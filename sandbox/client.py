"""Clients of the supervisor.

* `Client`: blocking, for scripts and judges. It talks to a running daemon; where none
  runs it runs the supervisor in-process (slower to start, same results).
* `AsyncClient`: for trio programs; many jobs at once over one connection.

Both speak `protocol.py` over the daemon's unix socket. Importing this module costs only
msgpack and the socket module: trio is imported only for the in-process fallback.

    from sandbox import Client, JobSpec, Limits
    with Client() as client:
        result = client.run(JobSpec(image="py3", argv=["python3", "-c", "print(6 * 7)"],
                                    limits=Limits(time=1, memory="256M")))
    print(result.status, result.stdout)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import __version__, runtime
from .errors import DaemonError, SandboxError
from .protocol import (
    PROTOCOL_VERSION,
    CancelJob,
    Connection,
    ErrorReply,
    Event,
    FileData,
    GetVersion,
    Hello,
    JobFinished,
    JobKilled,
    JobList,
    KillJob,
    ListJobs,
    Output,
    Ping,
    Pong,
    Progress,
    RunJob,
    StdinData,
    VersionInfo,
    Welcome,
)
from .spec import JobSpec, Result

if TYPE_CHECKING:
    import trio

OutputSink = Callable[[str, bytes], None]
ProgressSink = Callable[[str], None]


def socket_path() -> Path:
    """The daemon's socket: ``$SANDBOX_SOCKET``, else ``sandbox.sock`` in the runtime dir
    (`runtime.runtime_dir_path`)."""
    return Path(runtime.socket_path())


def _finished(event: JobFinished) -> Result:
    return Result.from_dict(event.result)


INLINE_FILES = 16 << 20  # a job's files up to this many bytes travel in its RunJob
UPLOAD_CHUNK = 1 << 20


def _run_messages(job_id: int, spec: JobSpec, *, stream_output: bool, stdin_stream: bool,
                  ) -> tuple[RunJob, Iterator[FileData]]:
    """The job's RunJob, and the FileData messages that carry its files when they are too
    large to go along (every message stays far below the daemon's message bound)."""
    data = spec.to_dict()
    if sum(len(f.data) for f in spec.files) <= INLINE_FILES:
        return RunJob(job_id, data, stream_output, stdin_stream), iter(())
    files = [{"name": f.name, "mode": f.mode, "size": len(f.data)} for f in spec.files]

    def chunks() -> Iterator[FileData]:
        for index, f in enumerate(spec.files):
            view = memoryview(f.data)
            for offset in range(0, max(len(view), 1), UPLOAD_CHUNK):
                end = offset + UPLOAD_CHUNK
                yield FileData(job_id, index, bytes(view[offset:end]), end >= len(view))

    return (RunJob(job_id, {**data, "files": files}, stream_output, stdin_stream, True),
            chunks())


class Client:
    """A blocking client. ``Client()`` connects to the daemon if one runs (``mode="auto"``),
    else runs jobs in-process; ``mode="daemon"`` insists on a daemon, ``mode="embedded"``
    never uses one. One job at a time per `Client` (use several, or `AsyncClient`)."""

    def __init__(self, path: Path | str | None = None, *, mode: str = "auto",
                 timeout: float | None = None) -> None:
        if mode not in ("auto", "daemon", "embedded"):
            raise ValueError(f"mode must be auto, daemon or embedded, not {mode!r}")
        self.path = Path(path) if path else socket_path()
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._ids = itertools.count(1)
        self.limits: dict[str, int] = {}
        if mode != "embedded":
            try:
                self._connect(timeout)
            except DaemonError:
                if mode == "daemon":
                    raise

    @property
    def embedded(self) -> bool:
        """True when jobs run in this process (no daemon reachable)."""
        return self._sock is None

    def _connect(self, timeout: float | None) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            while True:
                try:
                    sock.connect(str(self.path))
                    break
                except BlockingIOError:  # the daemon's accept backlog is full: wait our turn
                    if deadline is not None and time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        except OSError as e:
            sock.close()
            raise DaemonError(f"no daemon at {self.path} ({e.strerror or e})") from None
        self._sock = sock
        self._conn = Connection("client")
        self._write(Hello(PROTOCOL_VERSION, f"sandbox-client {__version__}"))
        welcome = self._read()
        if not isinstance(welcome, Welcome):
            self.close()
            raise DaemonError("the daemon did not answer the handshake")
        self.limits = dict(welcome.limits)

    def _write(self, event: Event) -> None:
        assert self._sock is not None and self._conn is not None
        try:
            self._sock.sendall(self._conn.send(event))
        except OSError as e:
            raise DaemonError(f"lost the daemon: {e.strerror or e}") from None

    def _read(self) -> Event:
        assert self._sock is not None and self._conn is not None
        while (event := self._conn.next_event()) is None:
            try:
                data = self._sock.recv(1 << 16)
            except OSError as e:
                raise DaemonError(f"lost the daemon: {e.strerror or e}") from None
            if not data:
                raise DaemonError("the daemon closed the connection")
            self._conn.receive_data(data)
        if isinstance(event, ErrorReply) and event.fatal:
            raise DaemonError(f"the daemon refused: {event.message}")
        return event

    def run(self, spec: JobSpec, *, on_output: OutputSink | None = None,
            on_progress: ProgressSink | None = None) -> Result:
        """Run ``spec`` to completion; ``on_output(stream, chunk)`` sees output as it comes."""
        if self._sock is None:
            return run_embedded(spec, on_output=on_output, on_progress=on_progress)
        job_id = next(self._ids)
        run, chunks = _run_messages(job_id, spec, stream_output=on_output is not None,
                                    stdin_stream=False)
        self._write(run)
        for chunk in chunks:
            self._write(chunk)
        while True:
            event = self._read()
            match event:
                case Output(stream=stream, data=data) if on_output is not None:
                    on_output(stream, data)
                case Progress(line=line) if on_progress is not None:
                    on_progress(line)
                case JobFinished():
                    return _finished(event)
                case ErrorReply(message=message):
                    raise SandboxError(message)
                case _:
                    continue

    def _request(self, event: Event, reply: type[Event]) -> Any:
        if self._sock is None:
            raise DaemonError("no daemon is running")
        self._write(event)
        while True:
            answer = self._read()
            if isinstance(answer, reply):
                return answer
            if isinstance(answer, ErrorReply):
                raise SandboxError(answer.message)

    def list_jobs(self) -> dict[str, Any]:
        """Running and queued jobs, the daemon's limits and its pool."""
        jobs: JobList = self._request(ListJobs(next(self._ids)), JobList)
        return {"running": jobs.running, "queued": jobs.queued, "limits": jobs.limits,
                "pool": jobs.pool}

    def kill(self, job: str) -> None:
        """Kill a job of the daemon's (any client's of this user's) by the id `list_jobs`
        and `sandbox ps` show; its result says ``cancelled``."""
        self._request(KillJob(next(self._ids), job), JobKilled)

    def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        t = time.perf_counter()
        self._request(Ping(next(self._ids)), Pong)
        return time.perf_counter() - t

    def version(self) -> dict[str, Any]:
        info: VersionInfo = self._request(GetVersion(next(self._ids)), VersionInfo)
        return {"version": info.version, "protocol": info.protocol}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def run_embedded(spec: JobSpec, *, on_output: OutputSink | None = None,
                 on_progress: ProgressSink | None = None) -> Result:
    """Run one job with a supervisor in this process (what the CLI does without a daemon)."""
    import trio  # noqa: PLC0415 - clients of a daemon never pay for trio

    from .supervisor.core import Supervisor  # noqa: PLC0415

    async def forward(stream: str, chunk: bytes) -> None:
        if on_output is not None:
            # In a thread: a reader that stalls (a full pipe) must not stop the event loop,
            # whose watchdogs enforce the job's time limits.
            await trio.to_thread.run_sync(on_output, stream, chunk)

    async def main() -> Result:
        async with Supervisor(on_progress=on_progress) as sup:
            return await sup.run(spec, forward if on_output else None)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # trio nurseries wrap what a task raised
        raise _unwrap(group) from None


def _first_sandbox_error(group: BaseExceptionGroup[BaseException]) -> SandboxError | None:
    for exc in group.exceptions:
        if isinstance(exc, SandboxError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_sandbox_error(exc)):
            return found
    return None


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What trio's nurseries wrapped: Ctrl-C (KeyboardInterrupt, wherever it landed), else
    the first `SandboxError`, else the group itself."""
    if group.subgroup(KeyboardInterrupt) is not None:
        return KeyboardInterrupt()
    return _first_sandbox_error(group) or group


def start_daemon(path: Path, idle_timeout: float = 300.0, wait: float = 30.0) -> None:
    """Start `sandbox daemon` in the background, logging to ``daemon.log`` next to the
    socket, and wait until it accepts connections. Where systemd runs it is a transient
    unit with ``Delegate=yes`` (``sandbox-daemon.service``: the user's manager, or the
    system's for root), so it gets a cgroup subtree of its own and outlives the caller's
    session scope; elsewhere a process in a session of its own."""
    from .cgroups import systemd  # noqa: PLC0415

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = path.parent / "daemon.log"
    argv = [sys.executable, "-m", "sandbox", "daemon", "--socket", str(path),
            "--idle-timeout", str(idle_timeout)]
    if systemd.running():
        env = {k: v for k, v in os.environ.items() if k not in _SERVICE_MANAGED_ENV}
        systemd.start_service(daemon_unit(path), argv, env, log=str(log),
                              description=f"sandbox daemon on {path}")
    else:
        with open(log, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, close_fds=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(DaemonError):
            Client(path, mode="daemon").close()
            return
        time.sleep(0.02)
    raise DaemonError(f"the daemon did not start (see {log})")


# What systemd sets for a unit itself (a daemon must not inherit the caller's).
_SERVICE_MANAGED_ENV = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                                  "INVOCATION_ID", "JOURNAL_STREAM", "MANAGERPID",
                                  "SYSTEMD_EXEC_PID", "WATCHDOG_PID", "WATCHDOG_USEC"})


def daemon_unit(path: Path) -> str:
    """The transient unit of a daemon started on demand: ``sandbox-daemon.service`` for the
    default socket, a name derived from the socket's path for any other."""
    if str(path) == runtime.default_socket_path():
        return "sandbox-daemon.service"
    import hashlib  # noqa: PLC0415

    return f"sandbox-daemon-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}.service"


def run_job(spec: JobSpec, *, on_output: OutputSink | None = None,
            on_progress: ProgressSink | None = None, stdin_fd: int | None = None) -> Result:
    """What `sandbox exec` does: use the daemon when one runs, else run in-process.
    ``SANDBOX_DAEMON=never`` always runs in-process; ``=start`` starts a daemon (which exits
    after 5 idle minutes) when none runs. With ``stdin_fd`` the job's stdin is a stream of
    what that descriptor gives, read as the job reads it (until EOF, or until the job ends:
    ``yes | sandbox exec -i head -1`` ends at once)."""
    choice = os.environ.get("SANDBOX_DAEMON", "auto")
    if choice not in ("auto", "never", "start"):
        raise SandboxError(f"SANDBOX_DAEMON must be auto, never or start, not {choice!r}")
    path = socket_path()
    if choice == "start" and not path.exists():
        start_daemon(path)
    mode = {"never": "embedded", "start": "daemon"}.get(choice, "auto")
    if stdin_fd is not None:
        return _run_streaming(spec, path, mode, stdin_fd, on_output, on_progress)
    if mode == "embedded":
        return run_embedded(spec, on_output=on_output, on_progress=on_progress)
    with Client(path, mode=mode) as client:
        return client.run(spec, on_output=on_output, on_progress=on_progress)


def _run_streaming(spec: JobSpec, path: Path, mode: str, stdin_fd: int,
                   on_output: OutputSink | None, on_progress: ProgressSink | None) -> Result:
    import trio  # noqa: PLC0415

    async def chunks() -> AsyncIterator[bytes]:
        while data := await trio.to_thread.run_sync(os.read, stdin_fd, 1 << 16,
                                                    abandon_on_cancel=True):
            yield data

    async def forward(stream: str, chunk: bytes) -> None:
        assert on_output is not None  # (in a thread: a stalled reader must not stop us)
        await trio.to_thread.run_sync(on_output, stream, chunk)

    async def main() -> Result:
        async with AsyncClient(path, mode=mode, on_progress=on_progress) as client:
            return await client.run(spec, on_output=forward if on_output else None,
                                    stdin=chunks())

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


class AsyncClient:
    """A trio client: run many jobs concurrently over one connection.

        async with AsyncClient() as client:
            async with trio.open_nursery() as n:
                for spec in specs:
                    n.start_soon(client.run, spec)

    As `Client`: ``mode="auto"`` uses the daemon when one runs and otherwise runs a
    supervisor in this trio program (`embedded`); ``"daemon"`` insists on a daemon,
    ``"embedded"`` never uses one.
    """

    def __init__(self, path: Path | str | None = None, *, mode: str = "auto",
                 on_progress: ProgressSink | None = None) -> None:
        if mode not in ("auto", "daemon", "embedded"):
            raise ValueError(f"mode must be auto, daemon or embedded, not {mode!r}")
        self.path = Path(path) if path else socket_path()
        self.mode = mode
        self.on_progress = on_progress  # build and pull progress lines
        self._conn = Connection("client")
        self._ids = itertools.count(1)
        self._waiters: dict[int, Any] = {}
        self._stack = contextlib.AsyncExitStack()
        self._stream: trio.SocketStream | None = None
        self._lock: trio.Lock | None = None
        self._supervisor: Any = None
        self._controls: dict[int, Any] = {}
        self.limits: dict[str, int] = {}

    @property
    def embedded(self) -> bool:
        """True when jobs run in this process (no daemon reachable)."""
        return self._supervisor is not None

    async def __aenter__(self) -> AsyncClient:
        if self.mode != "embedded":
            try:
                return await self._connect()
            except DaemonError:
                if self.mode == "daemon":
                    raise
        from .supervisor.core import Supervisor  # noqa: PLC0415

        self._supervisor = await self._stack.enter_async_context(
            Supervisor(on_progress=self.on_progress))
        return self

    async def _connect(self) -> AsyncClient:
        import trio  # noqa: PLC0415

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        while True:  # (trio's own connect takes a full accept backlog for "in progress")
            try:
                sock.connect(str(self.path))
                break
            except BlockingIOError:  # the daemon's accept backlog is full: wait our turn
                await trio.sleep(0.01)
            except OSError as e:
                sock.close()
                raise DaemonError(f"no daemon at {self.path} ({e.strerror or e})") from None
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        await self._stack.enter_async_context(self._stream)
        self._lock = trio.Lock()
        await self._send(Hello(PROTOCOL_VERSION, f"sandbox-async-client {__version__}"))
        welcome = await self._next()
        if isinstance(welcome, ErrorReply):
            raise DaemonError(f"the daemon refused: {welcome.message}")
        if not isinstance(welcome, Welcome):
            raise DaemonError("the daemon did not answer the handshake")
        self.limits = dict(welcome.limits)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._reader)
        self._nursery: trio.Nursery | None = nursery
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._stream is not None and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self._stack.aclose()

    async def _send(self, event: Event) -> None:
        import trio  # noqa: PLC0415

        assert self._stream is not None and self._lock is not None
        async with self._lock:
            try:
                await self._stream.send_all(self._conn.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise DaemonError(f"lost the daemon: {e}") from None

    async def _next(self) -> Event | None:
        assert self._stream is not None
        while (event := self._conn.next_event()) is None:
            data = await self._stream.receive_some(1 << 16)
            if not data:
                return None
            self._conn.receive_data(data)
        return event

    async def _reader(self) -> None:
        while True:
            event = await self._next()
            if event is None or (isinstance(event, ErrorReply) and event.fatal):
                for send in self._waiters.values():
                    send.close()
                self._waiters.clear()
                return
            send = self._waiters.get(getattr(event, "id", -1))
            if send is not None:
                import trio  # noqa: PLC0415

                # (an answer that comes after its job's result, e.g. to stdin sent as the
                # job ended, has no one to go to)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send(event)

    def _subscribe(self, job_id: int) -> Any:
        import trio  # noqa: PLC0415

        send, receive = trio.open_memory_channel[Event](float("inf"))
        self._waiters[job_id] = send
        return receive

    async def run(self, spec: JobSpec, *, on_output: Callable[[str, bytes], Any] | None = None,
                  stdin: AsyncIterator[bytes] | None = None) -> Result:
        """Run ``spec``; ``on_output`` may be sync or async. ``stdin``, if given, is an async
        iterator of chunks streamed to the job's stdin as it runs. Cancelling the call
        cancels the job."""
        import inspect  # noqa: PLC0415

        import trio  # noqa: PLC0415

        job_id = next(self._ids)
        if self._supervisor is not None:
            return await self._run_embedded(job_id, spec, on_output, stdin)
        receive = self._subscribe(job_id)
        outcome: Result | SandboxError = DaemonError("the daemon closed the connection")
        done = False
        try:
            run, chunks = _run_messages(job_id, spec, stream_output=on_output is not None,
                                        stdin_stream=stdin is not None)
            await self._send(run)
            for chunk in chunks:
                await self._send(chunk)
            async with receive, trio.open_nursery() as nursery:
                if stdin is not None:
                    nursery.start_soon(self._pump_stdin, job_id, stdin)
                async for event in receive:
                    if isinstance(event, Output) and on_output is not None:
                        shown = on_output(event.stream, event.data)
                        if inspect.isawaitable(shown):
                            await shown
                    elif isinstance(event, Progress) and self.on_progress is not None:
                        self.on_progress(event.line)
                    elif isinstance(event, JobFinished | ErrorReply):
                        done = True
                        outcome = (_finished(event) if isinstance(event, JobFinished)
                                   else SandboxError(event.message))
                        nursery.cancel_scope.cancel()
                        break
        finally:
            self._waiters.pop(job_id, None)
            if not done:
                with trio.CancelScope(shield=True), contextlib.suppress(DaemonError):
                    await self._send(CancelJob(job_id))
        if isinstance(outcome, SandboxError):
            raise outcome
        return outcome

    async def _pump_stdin(self, job_id: int, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            await self._send(StdinData(job_id, chunk))
        await self._send(StdinData(job_id, b"", eof=True))

    async def _run_embedded(self, job_id: int, spec: JobSpec,
                            on_output: Callable[[str, bytes], Any] | None,
                            stdin: AsyncIterator[bytes] | None) -> Result:
        import inspect  # noqa: PLC0415

        import trio  # noqa: PLC0415

        from .supervisor.job import JobControl  # noqa: PLC0415

        control = JobControl(stdin_stream=stdin is not None)
        self._controls[job_id] = control

        async def forward(stream: str, chunk: bytes) -> None:
            assert on_output is not None
            shown = on_output(stream, chunk)
            if inspect.isawaitable(shown):
                await shown

        async def pump(chunks: AsyncIterator[bytes]) -> None:
            async for chunk in chunks:
                await control.send_stdin(chunk)
            await control.send_stdin(b"", eof=True)

        try:
            async with trio.open_nursery() as nursery:
                if stdin is not None:
                    nursery.start_soon(pump, stdin)
                result: Result = await self._supervisor.run(
                    spec, forward if on_output else None, control=control)
                nursery.cancel_scope.cancel()
        finally:
            self._controls.pop(job_id, None)
        return result

    async def cancel(self, job_id: int) -> None:
        if self._supervisor is not None:
            if (control := self._controls.get(job_id)) is not None:
                control.cancel()
            return
        await self._send(CancelJob(job_id))

    async def kill(self, job: str) -> None:
        """Kill a job by the id `list_jobs` and `sandbox ps` show (see `Client.kill`)."""
        if self._supervisor is not None:
            self._supervisor.kill(job)
            return
        request = next(self._ids)
        receive = self._subscribe(request)
        try:
            await self._send(KillJob(request, job))
            async with receive:
                async for answer in receive:
                    if isinstance(answer, ErrorReply):
                        raise SandboxError(answer.message)
                    return
        finally:
            self._waiters.pop(request, None)
        raise DaemonError("the daemon closed the connection")

    async def list_jobs(self) -> dict[str, Any]:
        if self._supervisor is not None:
            sup = self._supervisor
            return {"running": [j.to_dict() for j in sup.running.values()],
                    "queued": [j.to_dict() for j in sup.queued.values()],
                    "limits": {"max_running": sup.max_running}, "pool": {}}
        job_id = next(self._ids)
        receive = self._subscribe(job_id)
        try:
            await self._send(ListJobs(job_id))
            async with receive:
                async for answer in receive:
                    if isinstance(answer, JobList):
                        return {"running": answer.running, "queued": answer.queued,
                                "limits": answer.limits, "pool": answer.pool}
                    break
        finally:
            self._waiters.pop(job_id, None)
        raise DaemonError("unexpected answer to list")
