"""The daemon's wire protocol, sans-io: bytes in, events out; events in, bytes out.

No I/O and no trio here: the server, the blocking client and the async client all drive
the same `Connection`. See docs/protocol.md for the message reference.

Framing: each message is a msgpack map, preceded by its length as 4 bytes big-endian. A
frame longer than ``max_message`` is refused before it is buffered. The first message each
way is the handshake (``hello`` from the client, ``welcome`` from the server); a client
speaking another protocol version gets a fatal error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE = 64 << 20
_LEN = struct.Struct(">I")


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every message. ``TYPE`` is its wire name; fields map to map keys."""

    TYPE: ClassVar[str] = ""


# client -> server

@dataclass(frozen=True, slots=True)
class Hello(Event):
    TYPE: ClassVar[str] = "hello"
    version: int
    client: str = ""


@dataclass(frozen=True, slots=True)
class RunJob(Event):
    """Run a job. ``spec`` is a `JobSpec` in dict form (validated by the server, so a bad
    spec is an error for this job only). With ``stdin_stream`` the job's stdin is a pipe fed
    by `StdinData` messages instead of ``spec["stdin"]``."""

    TYPE: ClassVar[str] = "run"
    id: int
    spec: dict[str, Any]
    stream_output: bool = True
    stdin_stream: bool = False


@dataclass(frozen=True, slots=True)
class StdinData(Event):
    TYPE: ClassVar[str] = "stdin"
    id: int
    data: bytes = b""
    eof: bool = False


@dataclass(frozen=True, slots=True)
class CancelJob(Event):
    TYPE: ClassVar[str] = "cancel"
    id: int


@dataclass(frozen=True, slots=True)
class ListJobs(Event):
    TYPE: ClassVar[str] = "list"
    id: int


@dataclass(frozen=True, slots=True)
class Ping(Event):
    TYPE: ClassVar[str] = "ping"
    id: int


@dataclass(frozen=True, slots=True)
class GetVersion(Event):
    TYPE: ClassVar[str] = "version"
    id: int


# server -> client

@dataclass(frozen=True, slots=True)
class Welcome(Event):
    TYPE: ClassVar[str] = "welcome"
    version: int
    server: str
    limits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobQueued(Event):
    TYPE: ClassVar[str] = "queued"
    id: int
    position: int


@dataclass(frozen=True, slots=True)
class JobStarted(Event):
    TYPE: ClassVar[str] = "started"
    id: int


@dataclass(frozen=True, slots=True)
class Output(Event):
    TYPE: ClassVar[str] = "output"
    id: int
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True, slots=True)
class Progress(Event):
    """A line of progress (an image being built or pulled for this job)."""

    TYPE: ClassVar[str] = "progress"
    id: int
    line: str


@dataclass(frozen=True, slots=True)
class JobFinished(Event):
    """The final `Result` of a job, in dict form (``status``, ``exit_code``, ``signal``,
    ``cpu_time``, ``wall_time``, ``memory``, ``stdout``, ``stderr``, ``setup_time``...)."""

    TYPE: ClassVar[str] = "result"
    id: int
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorReply(Event):
    """An error for request ``id`` (or for the connection, ``id`` None). ``fatal`` means the
    server closes the connection after sending it."""

    TYPE: ClassVar[str] = "error"
    id: int | None
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class JobList(Event):
    TYPE: ClassVar[str] = "jobs"
    id: int
    running: list[dict[str, Any]]
    queued: list[dict[str, Any]]
    limits: dict[str, int]
    pool: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pong(Event):
    TYPE: ClassVar[str] = "pong"
    id: int


@dataclass(frozen=True, slots=True)
class VersionInfo(Event):
    TYPE: ClassVar[str] = "version_info"
    id: int
    version: str
    protocol: int


CLIENT_EVENTS: dict[str, type[Event]] = {c.TYPE: c for c in (
    Hello, RunJob, StdinData, CancelJob, ListJobs, Ping, GetVersion)}
SERVER_EVENTS: dict[str, type[Event]] = {c.TYPE: c for c in (
    Welcome, JobQueued, JobStarted, Output, Progress, JobFinished, ErrorReply, JobList, Pong,
    VersionInfo)}

# Expected wire types of each field, checked on decode (msgpack gives us plain values).
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, bytes),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "int|None": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
}
_KIND = {"int": "int", "str": "str", "bytes": "bytes", "bool": "bool",
         "dict[str, Any]": "dict", "dict[str, int]": "dict", "list[dict[str, Any]]": "list",
         "int | None": "int|None"}


def _encode(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"t": event.TYPE}
    for f in fields(event):
        out[f.name] = getattr(event, f.name)
    return out


def _decode(raw: Any, table: dict[str, type[Event]]) -> Event:
    if not isinstance(raw, dict):
        raise RemoteProtocolError("a message must be a map")
    kind = raw.get("t")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {str(raw.get('t'))[:40]!r}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in raw:
            value = raw[f.name]
            kind = _KIND[str(f.type)]
            if not _CHECKS[kind](value):
                raise RemoteProtocolError(f"{cls.TYPE}: field {f.name!r} must be {kind}")
            kwargs[f.name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RemoteProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
    return cls(**kwargs)


# ------------------------------------------------------------------------------ framing


class Connection:
    """One side of a connection. ``role`` is ``"client"`` or ``"server"``.

    Feed received bytes to `receive_data`, then call `next_event` until it returns None
    (more data needed). `send` turns an event into bytes to write. Any violation by the
    peer raises `RemoteProtocolError`; after that the connection is unusable.
    """

    def __init__(self, role: str, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if role not in ("client", "server"):
            raise ValueError(role)
        self.role = role
        self.max_message = max_message
        self._buf = bytearray()
        self._incoming = CLIENT_EVENTS if role == "server" else SERVER_EVENTS
        self._outgoing = SERVER_EVENTS if role == "server" else CLIENT_EVENTS
        self.handshake_received = False
        self.handshake_sent = False
        self.broken = False

    def receive_data(self, data: bytes) -> None:
        if self.broken:
            raise RemoteProtocolError("connection already failed")
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        if len(self._buf) < _LEN.size:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self.max_message:
            self.broken = True
            raise RemoteProtocolError(f"message of {length} bytes exceeds the limit of "
                                      f"{self.max_message}")
        end = _LEN.size + length
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[_LEN.size:end])
        del self._buf[:end]
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # noqa: BLE001 - msgpack raises many types on bad input
            self.broken = True
            raise RemoteProtocolError(f"malformed message: {type(e).__name__}") from None
        try:
            event = _decode(raw, self._incoming)
        except RemoteProtocolError:
            self.broken = True
            raise
        self._check_handshake(event)
        return event

    def _check_handshake(self, event: Event) -> None:
        first = Hello if self.role == "server" else Welcome
        if not self.handshake_received:
            if not isinstance(event, first):
                self.broken = True
                raise RemoteProtocolError(f"expected {first.TYPE} first, got {event.TYPE}")
            if event.version != PROTOCOL_VERSION:
                self.broken = True
                raise RemoteProtocolError(f"protocol version {event.version} is not supported "
                                          f"(this side speaks {PROTOCOL_VERSION})")
            self.handshake_received = True
        elif isinstance(event, first):
            self.broken = True
            raise RemoteProtocolError(f"a second {first.TYPE}")

    def send(self, event: Event) -> bytes:
        if type(event).TYPE not in self._outgoing:
            raise LocalProtocolError(f"a {self.role} cannot send {type(event).TYPE}")
        first = Welcome if self.role == "server" else Hello
        if not self.handshake_sent and not isinstance(event, first | ErrorReply):
            raise LocalProtocolError(f"send {first.TYPE} first")
        self.handshake_sent = True
        body = bytes(msgpack.packb(_encode(event), use_bin_type=True))
        if len(body) > self.max_message:
            raise LocalProtocolError(f"message of {len(body)} bytes exceeds the limit")
        return _LEN.pack(len(body)) + body
