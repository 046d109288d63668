"""The sans-io protocol: framing, handshake, validation, fuzzing (no I/O)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.protocol import (
    _SCHEMA,
    CLIENT_EVENTS,
    MAX_ITEMS,
    PROTOCOL_VERSION,
    SERVER_EVENTS,
    CancelJob,
    Connection,
    ErrorReply,
    GetVersion,
    Hello,
    JobFinished,
    JobList,
    JobQueued,
    JobStarted,
    ListJobs,
    LocalProtocolError,
    Output,
    Ping,
    Pong,
    Progress,
    RemoteProtocolError,
    RunJob,
    StdinData,
    VersionInfo,
    Welcome,
)


def pair() -> tuple[Connection, Connection]:
    client, server = Connection("client"), Connection("server")
    server.receive_data(client.send(Hello(PROTOCOL_VERSION, "test")))
    assert server.next_event() == Hello(PROTOCOL_VERSION, "test")
    client.receive_data(server.send(Welcome(PROTOCOL_VERSION, "srv", {"max_running": 2})))
    assert isinstance(client.next_event(), Welcome)
    return client, server


def test_every_event_round_trips() -> None:
    client, server = pair()
    for event in (RunJob(1, {"image": "py3", "argv": ["x"], "stdin": b"\x00\xff"}),
                  StdinData(1, b"abc", eof=True), CancelJob(1), ListJobs(2), Ping(3),
                  GetVersion(4)):
        server.receive_data(client.send(event))
        assert server.next_event() == event
    for reply in (JobQueued(1, 3), JobStarted(1), Output(1, "stdout", b"\xffhi"),
                  Progress(1, "Step 1/2"), JobFinished(1, {"status": "ok", "stdout": b""}),
                  ErrorReply(1, "no", fatal=False), ErrorReply(None, "bad", fatal=True),
                  JobList(2, [], [{"id": "x"}], {"max_running": 2}, {"idle": 1}), Pong(3),
                  VersionInfo(4, "0.1", 1)):
        client.receive_data(server.send(reply))
        assert client.next_event() == reply


def test_byte_at_a_time() -> None:
    client, server = pair()
    data = client.send(RunJob(7, {"image": "a", "argv": ["b"]})) + client.send(Ping(8))
    got = []
    for byte in data:
        server.receive_data(bytes([byte]))
        while (event := server.next_event()) is not None:
            got.append(event)
    assert got == [RunJob(7, {"image": "a", "argv": ["b"]}), Ping(8)]


def test_handshake_first_and_once() -> None:
    server = Connection("server")
    server.receive_data(Connection("client").send(Hello(1)) if False else b"")
    raw = msgpack.packb({"t": "ping", "id": 1})
    server.receive_data(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        server.next_event()
    client, server = pair()
    server.receive_data(client.send(Ping(1)))
    server.next_event()
    raw = msgpack.packb({"t": "hello", "version": 1})
    server.receive_data(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(RemoteProtocolError, match="second hello"):
        server.next_event()


def test_version_mismatch() -> None:
    server = Connection("server")
    raw = msgpack.packb({"t": "hello", "version": PROTOCOL_VERSION + 1})
    server.receive_data(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(RemoteProtocolError, match="version"):
        server.next_event()


def test_oversized_message_refused_before_buffering() -> None:
    server = Connection("server", max_message=1024)
    server.receive_data(struct.pack(">I", 1 << 30))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"more")


@pytest.mark.parametrize("payload", [
    b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"t": "nope"}),
    msgpack.packb({"t": "run", "id": "one", "spec": {}}),
    msgpack.packb({"t": "run", "id": 1}), msgpack.packb({"t": "ping", "id": True}),
    msgpack.packb({1: 2}),
])
def test_malformed_messages(payload: bytes) -> None:
    _, server = pair()
    server.receive_data(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_local_misuse() -> None:
    client = Connection("client")
    with pytest.raises(LocalProtocolError):
        client.send(Ping(1))  # before hello
    with pytest.raises(LocalProtocolError):
        client.send(Welcome(1, "x"))  # a server message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_server_decoder(data: bytes) -> None:
    """Arbitrary bytes either need more data or are refused with RemoteProtocolError."""
    for conn in (Connection("server", max_message=4096), pair()[1]):
        conn.receive_data(data)
        try:
            while conn.next_event() is not None:
                pass
        except RemoteProtocolError:
            pass


INTS = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["t", "id", "spec", "data", "eof", "version", "x"]),
                       st.one_of(st.none(), st.booleans(),
                                 INTS, st.text(max_size=8),
                                 st.binary(max_size=8), st.lists(INTS, max_size=3),
                                 st.sampled_from(["run", "ping", "stdin", "hello", "cancel"]))))
def test_fuzz_structured_messages(message: dict[str, object]) -> None:
    _, server = pair()
    raw = msgpack.packb(message, use_bin_type=True)
    server.receive_data(struct.pack(">I", len(raw)) + raw)
    try:
        event = server.next_event()
    except RemoteProtocolError:
        return
    assert event is not None


@pytest.mark.parametrize("filler", [b"\x80", b"\x90", b"\xa2ab"])  # {}, [], "ab"
def test_a_small_message_cannot_expand_into_huge_memory(filler: bytes) -> None:
    """A ping carrying 2 million empty maps is a 2 MB frame (well under the limit) that
    msgpack would turn into about 120 MB of Python objects; a 64 MiB frame, into gigabytes.
    Refused once the elements of all containers pass MAX_ITEMS."""
    n = 2_000_000
    for nested in (False, True):
        inner = (filler * n if not nested else
                 (b"\xdc" + struct.pack(">H", 1000) + filler * 1000) * (n // 1000))
        body = (b"\x83\xa1t\xa4ping\xa2id\x01\xa1x\xdd" + struct.pack(">I", n // (
            1000 if nested else 1)) + inner)
        _, server = pair()
        server.receive_data(struct.pack(">I", len(body)) + body)
        with pytest.raises(RemoteProtocolError, match="items"):
            server.next_event()
    client, server = pair()  # a message near the budget is fine
    server.receive_data(client.send(RunJob(1, {"argv": ["x"] * (MAX_ITEMS // 2)})))
    assert isinstance(server.next_event(), RunJob)


_VALUES = {"int": INTS | st.integers(-5, 5),
           "str": st.text(max_size=30), "bytes": st.binary(max_size=300),
           "bool": st.booleans(), "int|None": st.none() | st.integers(0, 1 << 40),
           "dict": st.dictionaries(st.text(max_size=5), INTS | st.text(max_size=5)
                                   | st.binary(max_size=5) | st.none(), max_size=4),
           "list": st.lists(st.dictionaries(st.text(max_size=5), INTS, max_size=3),
                            max_size=3)}


@st.composite
def events(draw: st.DrawFn, table: dict[str, type[Any]]) -> Any:
    cls = draw(st.sampled_from(sorted(set(table.values()) - {Hello, Welcome}, key=str)))
    return cls(**{name: draw(_VALUES[kind]) for name, kind in _SCHEMA[cls]})


def _feed(conn: Connection, data: bytes, cuts: list[int]) -> list[object]:
    """Deliver ``data`` in pieces cut at ``cuts``; the events that came out."""
    got: list[object] = []
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        conn.receive_data(data[last:cut])
        last = cut
        while (event := conn.next_event()) is not None:
            got.append(event)
    return got


@settings(max_examples=300, deadline=None)
@given(st.lists(events(CLIENT_EVENTS), max_size=6), st.lists(events(SERVER_EVENTS), max_size=6),
       st.lists(st.integers(0, 1 << 16), max_size=8))
def test_fuzz_any_well_typed_event_round_trips(to_server: list[Any], to_client: list[Any],
                                               cuts: list[int]) -> None:
    """Every event of either side, whatever its field values, arrives whole and equal,
    however the byte stream is cut."""
    client, server = pair()
    assert _feed(server, b"".join(client.send(e) for e in to_server), cuts) == to_server
    assert _feed(client, b"".join(server.send(e) for e in to_client), cuts) == to_client


@settings(max_examples=400, deadline=None)
@given(st.lists(events(CLIENT_EVENTS), min_size=1, max_size=5), st.data())
def test_fuzz_corrupted_stream(sent: list[Any], data: st.DataObject) -> None:
    """A valid stream with bytes flipped, cut out or inserted: the events before the damage
    arrive intact, then the decoder either waits for more, yields events it can check, or
    refuses with RemoteProtocolError (and stays refused); it never raises anything else and
    never keeps more than one frame's bytes."""
    client, server = pair()
    frames = [client.send(e) for e in sent]
    stream = bytearray(b"".join(frames))
    at = data.draw(st.integers(0, len(stream) - 1), label="at")
    how = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="how")
    if how == "flip":
        stream[at] ^= data.draw(st.integers(1, 255), label="xor")
    elif how == "cut":
        del stream[at:at + data.draw(st.integers(1, 16), label="n")]
    else:
        stream[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="junk")
    intact = 0
    while intact < len(frames) and sum(map(len, frames[:intact + 1])) <= at:
        intact += 1
    cuts = data.draw(st.lists(st.integers(0, 1 << 12), max_size=4), label="cuts")
    try:
        got = _feed(server, bytes(stream), cuts)
    except RemoteProtocolError:
        assert server.broken
        with pytest.raises(RemoteProtocolError):
            server.receive_data(b"\x00")
        return
    assert got[:intact] == sent[:intact]
    assert server.buffered < 4 + server.max_message
