"""The sans-io protocol: framing, handshake, validation, fuzzing (no I/O)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.protocol import (
    PROTOCOL_VERSION,
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
    for event in (JobQueued(1, 3), JobStarted(1), Output(1, "stdout", b"\xffhi"),
                  Progress(1, "Step 1/2"), JobFinished(1, {"status": "ok", "stdout": b""}),
                  ErrorReply(1, "no", fatal=False), ErrorReply(None, "bad", fatal=True),
                  JobList(2, [], [{"id": "x"}], {"max_running": 2}, {"idle": 1}), Pong(3),
                  VersionInfo(4, "0.1", 1)):
        client.receive_data(server.send(event))
        assert client.next_event() == event


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
