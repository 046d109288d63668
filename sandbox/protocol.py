"""The daemon's wire protocol, sans-io: bytes in, events out; events in, bytes out.

No I/O and no trio here: the server, the blocking client and the async client all drive
the same `Connection`. See docs/protocol.md for the message reference.

Framing (`framing.py`): each message is a msgpack map, preceded by its length as 4 bytes
big-endian. A frame longer than ``max_message`` is refused before it is buffered. The first
message each way is the handshake (``hello`` from the client, ``welcome`` from the server); a client
speaking another protocol version gets a fatal error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import ProtocolError
from .framing import DEFAULT_MAX_MESSAGE, LENGTH, FrameReader, encode
from .framing import MAX_ITEMS as MAX_ITEMS
from .framing import RemoteProtocolError as RemoteProtocolError

PROTOCOL_VERSION = 1


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


# ------------------------------------------------------------------------------ events
# Messages are NamedTuples (cheap to define: the CLI's start-up time matters); ``TYPE`` is a
# message's wire name, its fields are the map's other keys.


# client -> server

class Hello(NamedTuple):
    version: int
    client: str = ""


class RunJob(NamedTuple):
    """Run a job. ``spec`` is a `JobSpec` in dict form (validated by the server, so a bad
    spec is an error for this job only). With ``stdin_stream`` the job's stdin is a pipe fed
    by `StdinData` messages instead of ``spec["stdin"]``. With ``files_follow`` each entry of
    ``spec["files"]`` has a ``size`` instead of ``data``, and the data follows in `FileData`
    messages (the job starts once every file is complete): files of any size travel in
    bounded messages."""

    id: int
    spec: dict[str, Any]
    stream_output: bool = True
    stdin_stream: bool = False
    files_follow: bool = False  # the files' data comes in `FileData` messages, not in spec


class StdinData(NamedTuple):
    id: int
    data: bytes = b""
    eof: bool = False


class FileData(NamedTuple):
    """A chunk of file number ``file`` of job ``id`` (a `RunJob` with ``files_follow``)."""

    id: int
    file: int
    data: bytes = b""
    eof: bool = False


class CancelJob(NamedTuple):
    id: int


class ListJobs(NamedTuple):
    id: int


class KillJob(NamedTuple):
    """Kill a job of any connection of this user's, by the id `ListJobs` shows."""

    id: int
    job: str


class Ping(NamedTuple):
    id: int


class GetVersion(NamedTuple):
    id: int


# server -> client

class Welcome(NamedTuple):
    version: int
    server: str
    limits: dict[str, int] = {}  # noqa: RUF012 - never mutated


class JobQueued(NamedTuple):
    id: int
    position: int


class JobStarted(NamedTuple):
    id: int


class Output(NamedTuple):
    id: int
    stream: str  # "stdout" | "stderr"
    data: bytes


class Progress(NamedTuple):
    """A line of progress (an image being built or pulled for this job)."""

    id: int
    line: str


class JobFinished(NamedTuple):
    """The final `Result` of a job, in dict form (``status``, ``exit_code``, ``signal``,
    ``cpu_time``, ``wall_time``, ``memory``, ``stdout``, ``stderr``, ``setup_time``...)."""

    id: int
    result: dict[str, Any]


class ErrorReply(NamedTuple):
    """An error for request ``id`` (or for the connection, ``id`` None). ``fatal`` means the
    server closes the connection after sending it."""

    id: int | None
    message: str
    fatal: bool = False


class JobList(NamedTuple):
    id: int
    running: list[dict[str, Any]]
    queued: list[dict[str, Any]]
    limits: dict[str, int]
    pool: dict[str, int] = {}  # noqa: RUF012 - never mutated


class Pong(NamedTuple):
    id: int


class JobKilled(NamedTuple):
    id: int
    job: str


class VersionInfo(NamedTuple):
    id: int
    version: str
    protocol: int


ClientEvent = (Hello | RunJob | StdinData | FileData | CancelJob | ListJobs | KillJob | Ping
               | GetVersion)
ServerEvent = (Welcome | JobQueued | JobStarted | Output | Progress | JobFinished | ErrorReply
               | JobList | JobKilled | Pong | VersionInfo)
Event = ClientEvent | ServerEvent

CLIENT_EVENTS: dict[str, type[Any]] = {
    "hello": Hello, "run": RunJob, "stdin": StdinData, "file": FileData, "cancel": CancelJob,
    "list": ListJobs, "kill": KillJob, "ping": Ping, "version": GetVersion}
SERVER_EVENTS: dict[str, type[Any]] = {
    "welcome": Welcome, "queued": JobQueued, "started": JobStarted, "output": Output,
    "progress": Progress, "result": JobFinished, "error": ErrorReply, "jobs": JobList,
    "killed": JobKilled, "pong": Pong, "version_info": VersionInfo}
_NAMES: dict[type[Any], str] = {cls: name for name, cls in (*CLIENT_EVENTS.items(),
                                                            *SERVER_EVENTS.items())}


def wire_name(event: Event) -> str:
    """The message's ``t`` on the wire (``"run"`` for `RunJob`...)."""
    return _NAMES[type(event)]

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


# (field, wire type) of each message, from its annotations (strings, or ForwardRefs)
_SCHEMA: dict[type[Any], tuple[tuple[str, str], ...]] = {
    cls: tuple((name, _KIND[str(getattr(a, "__forward_arg__", a))])
               for name, a in cls.__annotations__.items())
    for cls in _NAMES}



def _encode(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = event._asdict()
    out["t"] = _NAMES[type(event)]
    return out


def _decode(raw: Any, table: dict[str, type[Any]]) -> Event:
    if not isinstance(raw, dict):
        raise RemoteProtocolError("a message must be a map")
    kind = raw.get("t")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
        raise RemoteProtocolError(f"unknown message type {shown!r}")
    kwargs: dict[str, Any] = {}
    for name, check in _SCHEMA[cls]:
        if name in raw:
            value = raw[name]
            if not _CHECKS[check](value):
                raise RemoteProtocolError(f"{kind}: field {name!r} must be {check}")
            kwargs[name] = value
        elif name not in cls._field_defaults:
            raise RemoteProtocolError(f"{kind}: missing field {name!r}")
    event: Event = cls(**kwargs)
    return event


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
        self._frames = FrameReader(max_message)
        self._incoming = CLIENT_EVENTS if role == "server" else SERVER_EVENTS
        self._outgoing = SERVER_EVENTS if role == "server" else CLIENT_EVENTS
        self.handshake_received = False
        self.handshake_sent = False
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as an event (at most one frame's worth)."""
        return self._frames.buffered

    def receive_data(self, data: bytes) -> None:
        if self.broken:
            raise RemoteProtocolError("connection already failed")
        self._frames.feed(data)

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        try:
            raw = self._frames.next()
            if raw is None:
                return None
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
                raise RemoteProtocolError(f"expected {_NAMES[first]} first, got "
                                          f"{wire_name(event)}")
            if event.version != PROTOCOL_VERSION:
                self.broken = True
                raise RemoteProtocolError(f"protocol version {event.version} is not supported "
                                          f"(this side speaks {PROTOCOL_VERSION})")
            self.handshake_received = True
        elif isinstance(event, first):
            self.broken = True
            raise RemoteProtocolError(f"a second {_NAMES[first]}")

    def send(self, event: Event) -> bytes:
        name = _NAMES.get(type(event), "")
        if self._outgoing.get(name) is not type(event):
            raise LocalProtocolError(f"a {self.role} cannot send {type(event).__name__}")
        first = Welcome if self.role == "server" else Hello
        if not self.handshake_sent and not isinstance(event, first | ErrorReply):
            raise LocalProtocolError(f"send {_NAMES[first]} first")
        self.handshake_sent = True
        frame = encode(_encode(event))
        if len(frame) - LENGTH.size > self.max_message:
            raise LocalProtocolError(f"message of {len(frame)} bytes exceeds the limit")
        return frame
