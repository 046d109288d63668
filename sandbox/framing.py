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
# Elements of all arrays and maps in one message together: a byte on the wire can be a
# 60-byte Python object (an empty map), so a 64 MiB frame of them would take gigabytes.
MAX_ITEMS = 1 << 20


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class _TooManyItems(Exception):
    pass


def _unpack(frame: bytes) -> object:
    """msgpack with a budget of `MAX_ITEMS` elements over all containers (each container
    is bounded before it is built, and counted once it is)."""
    left = MAX_ITEMS

    def count(container: object) -> object:
        nonlocal left
        left -= len(container) + 1  # type: ignore[arg-type]
        if left < 0:
            raise _TooManyItems
        return container

    return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True,
                           max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
                           list_hook=count, object_hook=count)


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

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self._buf)

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
            raw = _unpack(frame)
        except Exception as e:  # noqa: BLE001 - msgpack raises many types on bad input
            if isinstance(e, _TooManyItems) or "exceeds max_" in str(e):
                raise RemoteProtocolError(f"message has more than {MAX_ITEMS} items") from None
            raise RemoteProtocolError(f"malformed message: {type(e).__name__}") from None
        if not isinstance(raw, dict):
            raise RemoteProtocolError("a message must be a map")
        return raw
