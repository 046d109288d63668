"""`sandbox daemon`: the trio supervisor served over a unix socket.

The socket lives in the per-user runtime dir (0700) and is itself 0600; every connection's
peer credentials (SO_PEERCRED) are checked and other uids are refused. A connection speaks
the protocol in `protocol.py`: a handshake, then any number of concurrent jobs, each with
its own id. A malformed or oversized message gets a fatal error reply and the connection is
closed; the daemon and other clients carry on. A client that disconnects has its jobs killed.
SIGTERM (or SIGINT) stops the daemon cleanly: new work is refused, running jobs are killed
and reported, the pool is drained, nothing is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from . import __version__, config, runtime
from .errors import DaemonError, SandboxError, SpecError
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
    JobQueued,
    JobStarted,
    KillJob,
    ListJobs,
    Output,
    Ping,
    Pong,
    Progress,
    RemoteProtocolError,
    RunJob,
    StdinData,
    VersionInfo,
    Welcome,
    wire_name,
)
from .spec import JobSpec, Status
from .supervisor.core import Supervisor
from .supervisor.job import JobControl

log = logging.getLogger("sandbox.daemon")


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info event=job_done id=c1-3 status=ok`` (one line per record)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(
            record.created)) + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
            "event": record.getMessage()}
        fields.update(getattr(record, "fields", {}))
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(value: Any) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _log(level: int, event: str, **fields: Any) -> None:
    log.log(level, event, extra={"fields": fields})


def default_socket_path() -> Path:
    config.runtime_dir()  # created 0700 and checked to be ours
    return Path(runtime.socket_path())


@dataclass
class DaemonConfig:
    socket_path: Path = field(default_factory=default_socket_path)
    pool_size: int = 4
    max_running: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queued: int = 4096
    max_jobs_per_connection: int = 1024
    max_message: int = 64 << 20
    max_upload: int = 1 << 30  # a job's files, in `FileData` messages (held in memory)
    idle_timeout: float | None = None
    warm: tuple[str, ...] = ()
    fair: bool = False  # queued jobs take turns between connections (else arrival order)

    def limits(self) -> dict[str, int]:
        return {"max_running": self.max_running, "max_queued": self.max_queued,
                "max_jobs_per_connection": self.max_jobs_per_connection,
                "max_message": self.max_message, "max_upload": self.max_upload,
                "pool_size": self.pool_size,
                "fair": int(self.fair)}


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Session:
    """One client connection: its jobs, and an outbox that keeps messages whole and in order.

    Everything for the client goes through the outbox, written by one task. A job's output
    never waits for the client (`post`): a client that stops reading must not stall its jobs,
    which would then hold their running slots past their limits; what they post is bounded
    by their output limit. Replies to requests (`send`) wait while more than
    `OUTBOX_HIGH` bytes are pending, so a client that floods requests without reading the
    answers is slowed down instead of filling the daemon's memory."""

    OUTBOX_HIGH = 1 << 20

    def __init__(self, daemon: Daemon, stream: trio.SocketStream, number: int) -> None:
        self.daemon = daemon
        self.stream = stream
        self.name = f"c{number}"
        self.conn = Connection("server", max_message=daemon.config.max_message)
        self.jobs: dict[int, JobControl] = {}
        self.uploads: dict[int, _Upload] = {}
        self._outbox, self._outgoing = trio.open_memory_channel[bytes](float("inf"))
        self._pending = 0
        self._drained = trio.lowlevel.ParkingLot()
        self.alive = True    # the client can still be written to
        self.closed = False  # the client is gone or broke the protocol: send nothing new

    def post(self, event: Event) -> None:
        """Queue ``event`` for the client without waiting."""
        if not self.alive or self.closed:
            return
        data = self.conn.send(event)
        self._pending += len(data)
        self._outbox.send_nowait(data)

    async def send(self, event: Event) -> None:
        """Queue ``event``, then wait while the client is far behind."""
        self.post(event)
        while self.alive and not self.closed and self._pending > self.OUTBOX_HIGH:
            await self._drained.park()

    async def _writer(self) -> None:
        async for data in self._outgoing:
            if self.alive:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.alive = False
            self._pending -= len(data)
            self._drained.unpark_all()
        self.alive = False
        self._drained.unpark_all()

    async def flush(self) -> None:
        """Wait until everything queued has been written (or the client is gone)."""
        while self.alive and self._pending:
            await self._drained.park()

    async def serve(self) -> None:
        sup = self.daemon.supervisor
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._writer)
                try:
                    async with trio.open_nursery() as jobs:
                        try:
                            await self._read_loop(jobs)
                        finally:  # the client is gone: kill its jobs
                            self.closed = True
                            self._drained.unpark_all()
                            for control in self.jobs.values():
                                control.cancel()
                finally:
                    self._outbox.close()  # the writer flushes what is queued, then ends
                    with trio.move_on_after(10):
                        await self.flush()
                    outer.cancel_scope.cancel()
        finally:
            _log(logging.INFO, "disconnect", conn=self.name, queued=len(sup.queued),
                 running=len(sup.running))

    async def _read_loop(self, jobs: trio.Nursery) -> None:
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not None:
                    await self._dispatch(event, jobs)
            except RemoteProtocolError as e:
                _log(logging.WARNING, "protocol_error", conn=self.name, error=str(e))
                self.post(ErrorReply(None, str(e), fatal=True))  # flushed before we hang up
                return

    async def _dispatch(self, event: Event, jobs: trio.Nursery) -> None:
        daemon = self.daemon
        match event:
            case Hello(client=client):
                _log(logging.INFO, "connect", conn=self.name, client=client)
                await self.send(Welcome(PROTOCOL_VERSION, f"sandbox {__version__}",
                                        daemon.config.limits()))
            case RunJob(id=job_id):
                if job_id in self.jobs:
                    await self.send(ErrorReply(job_id, f"job id {job_id} is already in use"))
                elif daemon.stopping:
                    await self.send(ErrorReply(job_id, "the daemon is shutting down"))
                elif len(self.jobs) >= daemon.config.max_jobs_per_connection:
                    await self.send(ErrorReply(job_id, "too many jobs on this connection "
                                               f"(max {daemon.config.max_jobs_per_connection})"))
                elif len(daemon.supervisor.queued) >= daemon.config.max_queued:
                    await self.send(ErrorReply(job_id, "the queue is full (max "
                                               f"{daemon.config.max_queued} waiting jobs)"))
                else:
                    control = JobControl(stdin_stream=event.stdin_stream)
                    upload = None
                    if event.files_follow:
                        try:
                            upload = _Upload.of(event.spec, daemon.config.max_upload)
                        except SandboxError as e:
                            await self.send(ErrorReply(job_id, str(e)))
                            return
                        self.uploads[job_id] = upload
                    self.jobs[job_id] = control
                    daemon.active_jobs += 1
                    jobs.start_soon(self._run_job, event, control, upload)
            case FileData(id=job_id, file=index, data=chunk, eof=eof):
                pending = self.uploads.get(job_id)
                try:
                    if pending is None:
                        raise SandboxError(f"job {job_id} takes no more file data")
                    if pending.add(index, chunk, eof):
                        del self.uploads[job_id]
                except SandboxError as e:
                    self.uploads.pop(job_id, None)
                    if (waiting := self.jobs.get(job_id)) is not None:
                        waiting.cancel()
                    await self.send(ErrorReply(job_id, str(e)))
            case StdinData(id=job_id, data=chunk, eof=eof):
                target = self.jobs.get(job_id)
                try:
                    if target is None:
                        raise SandboxError(f"no running job {job_id}")
                    await target.send_stdin(chunk, eof)  # (waits for a slow reader)
                except SandboxError as e:
                    await self.send(ErrorReply(job_id, str(e)))
            case CancelJob(id=job_id):
                if (target := self.jobs.get(job_id)) is not None:
                    target.cancel()
                else:
                    await self.send(ErrorReply(job_id, f"no running job {job_id}"))
            case KillJob(id=request, job=job):
                try:
                    daemon.supervisor.kill(job)
                except SandboxError as e:
                    await self.send(ErrorReply(request, str(e)))
                else:
                    await self.send(JobKilled(request, job))
            case ListJobs(id=job_id):
                sup = daemon.supervisor
                await self.send(JobList(job_id, [j.to_dict() for j in sup.running.values()],
                                        [j.to_dict() for j in sup.queued.values()],
                                        daemon.config.limits(), sup.pool.stats()))
            case Ping(id=job_id):
                await self.send(Pong(job_id))
            case GetVersion(id=job_id):
                await self.send(VersionInfo(job_id, __version__, PROTOCOL_VERSION))
            case _:
                raise RemoteProtocolError(f"unexpected {wire_name(event)}")

    async def _run_job(self, req: RunJob, control: JobControl,
                       upload: _Upload | None = None) -> None:
        sup = self.daemon.supervisor
        t0 = time.monotonic()
        token = trio.lowlevel.current_trio_token()

        async def on_output(stream: str, data: bytes) -> None:
            self.post(Output(req.id, stream, data))  # never waits for the client

        def on_progress(line: str) -> None:  # may be called from a build thread
            token.run_sync_soon(self.post, Progress(req.id, line))

        async def announce_start() -> None:  # the job's limits start after this: no waiting
            self.post(JobStarted(req.id))

        control.on_start = announce_start
        try:
            spec_dict = req.spec
            if upload is not None:
                await upload.complete.wait()
                if control.cancelled or upload.error:
                    return  # (the error went out when the data broke off)
                spec_dict = upload.spec()
            spec = JobSpec.from_dict(spec_dict)
            if sup.admission.value == 0:
                self.post(JobQueued(req.id, len(sup.queued) + 1))
            result = await sup.run(spec, on_output if req.stream_output else None,
                                   control=control, owner=self.name, progress=on_progress)
            if self.daemon.stopping and control.cancelled:
                result = replace(result, status=Status.INTERNAL_ERROR,
                                 message="the daemon shut down")
            await self.send(JobFinished(req.id, result.to_dict()))
            _log(logging.INFO, "job_done", conn=self.name, id=req.id, status=result.status.value,
                 cpu=result.cpu_time, wall=result.wall_time, memory=result.memory,
                 total=time.monotonic() - t0)
        except SandboxError as e:
            await self.send(ErrorReply(req.id, str(e)))
            _log(logging.INFO, "job_refused", conn=self.name, id=req.id, error=str(e))
        except Exception as e:  # a bug must cost one job, not the daemon
            log.exception("job_crashed", extra={"fields": {"conn": self.name, "id": req.id}})
            await self.send(ErrorReply(req.id, f"internal error: {type(e).__name__}: {e}"))
        finally:
            self.jobs.pop(req.id, None)
            self.uploads.pop(req.id, None)
            self.daemon.job_done()


class _Upload:
    """The files of a `RunJob` with ``files_follow``, as their `FileData` comes in."""

    def __init__(self, spec: dict[str, Any], sizes: list[int]) -> None:
        self.base = spec
        self.sizes = sizes
        self.parts: list[bytearray] = [bytearray() for _ in sizes]
        self.open = set(range(len(sizes)))
        self.complete = trio.Event()
        self.error = False

    @classmethod
    def of(cls, spec: dict[str, Any], limit: int) -> _Upload:
        files = spec.get("files")
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("size"), int) and f["size"] >= 0
                for f in files):
            raise SpecError("files_follow: every file needs a size")
        sizes = [int(f["size"]) for f in files]
        if sum(sizes) > limit:
            raise SpecError(f"the job's files take {sum(sizes)} bytes: this daemon takes at "
                            f"most {limit} (sandbox daemon --max-upload)")
        upload = cls(spec, sizes)
        if not sizes:
            upload.complete.set()
        return upload

    def add(self, index: int, chunk: bytes, eof: bool) -> bool:
        """Take a chunk; True once every file is complete."""
        try:
            if index not in self.open:
                raise SpecError(f"file {index}: no such file, or it is complete already")
            part = self.parts[index]
            if len(part) + len(chunk) > self.sizes[index]:
                raise SpecError(f"file {index}: more data than its size ({self.sizes[index]})")
            part += chunk
            if eof:
                if len(part) != self.sizes[index]:
                    raise SpecError(f"file {index}: {len(part)} of its {self.sizes[index]} "
                                    "bytes came")
                self.open.discard(index)
        except SpecError:
            self.error = True
            self.complete.set()
            raise
        if not self.open:
            self.complete.set()
            return True
        return False

    def spec(self) -> dict[str, Any]:
        files = [{**{k: v for k, v in f.items() if k != "size"}, "data": bytes(part)}
                 for f, part in zip(self.base["files"], self.parts, strict=True)]
        return {**self.base, "files": files}


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.config = cfg
        self.supervisor = Supervisor(pool_size=cfg.pool_size, max_running=cfg.max_running,
                                     fair=cfg.fair)
        self.sessions: set[Session] = set()
        self.stopping = False
        self.active_jobs = 0
        self._all_done = trio.Event()
        self._count = 0
        self._last_activity = time.monotonic()
        self._nursery: trio.Nursery | None = None

    def job_done(self) -> None:
        self.active_jobs -= 1
        if self.stopping and self.active_jobs == 0:
            self._all_done.set()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    async def handle(self, stream: trio.SocketStream) -> None:
        self._count += 1
        uid = peer_uid(stream.socket)  # type: ignore[arg-type]
        if uid != os.geteuid():
            _log(logging.WARNING, "refused", uid=uid, reason="another user")
            await stream.aclose()
            return
        session = Session(self, stream, self._count)
        self.sessions.add(session)
        try:
            async with stream:
                await session.serve()
        except Exception:  # a bug must cost one connection, not the daemon
            log.exception("connection_crashed", extra={"fields": {"conn": session.name}})
        finally:
            self.sessions.discard(session)
            self._last_activity = time.monotonic()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Catch SIGTERM/SIGINT from the very start, so that a stop during start-up is clean.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await self._run(signals, task_status)

    async def _run(self, signals: Any, task_status: Any) -> None:
        path = self.config.socket_path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DaemonError(f"cannot use {path.parent} for the socket: {e.strerror}") from None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DaemonError(f"a daemon already serves {path}") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a daemon that was killed
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(512)
            listener = trio.SocketListener(sock)
            try:
                async with self.supervisor, trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._signals, signals, nursery)
                    self.supervisor.pool.attach(nursery)
                    await self._warm()
                    if self.config.idle_timeout:
                        nursery.start_soon(self._idle_watch, nursery)
                    _log(logging.INFO, "listening", socket=str(path), pid=os.getpid(),
                         pool=self.config.pool_size, max_running=self.config.max_running,
                         cgroups=self.supervisor.cgroups.describe())
                    task_status.started()
                    await trio.serve_listeners(self.handle, [listener], handler_nursery=nursery)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                _log(logging.INFO, "stopped")
        finally:
            os.close(lock_fd)

    async def _warm(self) -> None:
        from .profiles import load_profile  # noqa: PLC0415

        for item in self.config.warm:
            ref, _, profile_name = item.partition("@")
            profile = load_profile(profile_name or "default")
            image = await self.supervisor.image(ref)
            self.supervisor.pool.warm(self.supervisor.job_shape(image, profile,
                                                                profile.limits)[1])

    async def _signals(self, signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            _log(logging.INFO, "shutdown", signal=signal.Signals(signum).name)
            await self.shutdown(nursery)
            return

    async def shutdown(self, nursery: trio.Nursery) -> None:
        """Refuse new jobs, kill and report running ones, then stop serving."""
        self.stopping = True
        for session in list(self.sessions):
            for control in session.jobs.values():
                control.cancel()
        with trio.move_on_after(10):
            if self.active_jobs:
                await self._all_done.wait()
            for session in list(self.sessions):  # their results out before we hang up
                await session.flush()
        nursery.cancel_scope.cancel()

    async def _idle_watch(self, nursery: trio.Nursery) -> None:
        timeout = float(self.config.idle_timeout or 0)
        while True:
            await trio.sleep(min(timeout, 1.0))
            busy = self.sessions or self.supervisor.running or self.supervisor.queued
            if busy:
                self._last_activity = time.monotonic()
            elif time.monotonic() - self._last_activity > timeout:
                _log(logging.INFO, "idle_exit", idle=timeout)
                await self.shutdown(nursery)
                return


def raise_descriptor_limit() -> None:
    """Every running job holds a few descriptors here (its init's pidfd and socket, its
    output pipes): lift the soft limit (often 1024) to the hard one, as servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_daemon(cfg: DaemonConfig, log_level: str = "info") -> None:
    """Entry point of `sandbox daemon`."""
    raise_descriptor_limit()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    log.addHandler(handler)
    log.setLevel(log_level.upper())
    log.propagate = False
    daemon = Daemon(cfg)
    trio.run(daemon.run)
