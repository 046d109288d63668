"""Frames of the daemon protocol: a 4-byte big-endian length, then a msgpack map.

The bottom layer of `protocol.py`, kept free of `typing` and of the typed messages so that
the CLI's fast path (`_fastexec.py`) can speak the protocol after importing almost nothing.
"""

from __future__ import annotations

import struct

import msgpack

from .errors import ProtocolError

LENGTH = struct.Struct(">I")
DEFAULT_MAX_MESSAGE = 64 << 20


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


def encode(message: dict[str, object]) -> bytes:
    body = bytes(msgpack.packb(message, use_bin_type=True))
    return LENGTH.pack(len(body)) + body


class FrameReader:
    """Bytes in, maps out. A frame over ``max_message`` is refused before it is buffered;
    a frame that is not a msgpack map is refused."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> dict[str, object] | None:
        """The next complete map, or None until more data arrives."""
        if len(self._buf) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self._buf)
        if length > self.max_message:
            raise RemoteProtocolError(f"message of {length} bytes exceeds the limit of "
                                      f"{self.max_message}")
        end = LENGTH.size + length
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[LENGTH.size:end])
        del self._buf[:end]
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # noqa: BLE001 - msgpack raises many types on bad input
            raise RemoteProtocolError(f"malformed message: {type(e).__name__}") from None
        if not isinstance(raw, dict):
            raise RemoteProtocolError("a message must be a map")
        return raw
