"""A raw client of the daemon for the load, fault and fuzz tests: frames sent as given (or
as garbage), events read back with the project's own sans-io `Connection`."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

from sandbox.protocol import PROTOCOL_VERSION, Connection, Event, Welcome
from sandbox.spec import JobSpec, Limits


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HELLO = frame({"t": "hello", "version": PROTOCOL_VERSION})


def run_frame(job_id: int, *argv: str, limits: Limits | None = None, **kw: Any) -> bytes:
    spec = JobSpec(image="busybox", argv=argv, limits=limits or Limits())
    return frame({"t": "run", "id": job_id, "spec": spec.to_dict(), **kw})


class Raw:
    """A blocking connection that sends bytes as given and decodes what comes back."""

    def __init__(self, path: Path, timeout: float = 120) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))  # blocking: waits while the accept backlog is full
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
        self.conn = Connection("client")
        self.conn.handshake_sent = True  # we send our own (maybe broken) frames

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> Welcome:
        self.send(HELLO)
        event = self.next()
        assert isinstance(event, Welcome), event
        return event

    def next(self) -> Event | None:
        """The next event, or None once the daemon hung up."""
        while (event := self.conn.next_event()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.conn.receive_data(data)
        return event

    def until(self, kind: type[Any], job_id: int | None = None) -> Any:
        """Read events up to the first of ``kind`` (for ``job_id``, if given)."""
        while (event := self.next()) is not None:
            if isinstance(event, kind) and (job_id is None
                                            or getattr(event, "id", None) == job_id):
                return event
        raise AssertionError(f"the daemon hung up before a {kind.__name__}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
