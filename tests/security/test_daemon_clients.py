"""Hostile and broken clients of one daemon: clients that stop reading, send garbage,
disconnect mid-job or flood it, while well-behaved clients run jobs next to them. The
well-behaved ones must get every result, and correct; the daemon must carry on."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import trio

from sandbox.client import AsyncClient, Client
from sandbox.protocol import ErrorReply, JobFinished, Output
from sandbox.spec import JobSpec, Limits
from tests.conftest import Runner, start_daemon

from .wire import HELLO, Raw, frame, run_frame

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_a_client_that_stops_reading_holds_no_running_slot(tmp_path: Path,
                                                           root_runner: Runner) -> None:
    """A job whose client does not read its streamed output must still end at its limits
    and give its running slot back: with one slot, a bystander's job must still run."""
    d = start_daemon(tmp_path, "--pool", "0", "--max-running", "1")
    try:
        hog = Raw(d.path)
        hog.send(HELLO + run_frame(1, "head", "-c", "20000000", "/dev/zero",
                                   limits=Limits(output=4 << 20, wall_time=5)))
        with d.client() as bystander:
            bystander._sock.settimeout(60)  # type: ignore[union-attr]  # fail, not hang
            r = bystander.run(JobSpec(image="busybox", argv=("echo", "through")))
            assert (r.status.value, r.stdout) == ("ok", b"through\n")
        # the hog's output and result were kept for it, in order
        streamed = 0
        while not isinstance(event := hog.next(), JobFinished):
            assert event is not None, "the daemon hung up on the hog"
            if isinstance(event, Output):
                streamed += len(event.data)
        assert event.result["status"] == "output_limit"
        assert streamed == len(event.result["stdout"]) == 4 << 20
        hog.close()
        with d.client() as client:
            assert client.list_jobs()["running"] == []
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def _bystanders(path: Path, clients: int, jobs: int) -> list[str]:
    """Run ``jobs`` jobs on each of ``clients`` connections at once; return what was wrong."""
    wrong: list[str] = []

    def worker(n: int) -> None:
        try:
            with Client(path, mode="daemon", timeout=300) as client:
                for i in range(jobs):
                    r = client.run(JobSpec(image="busybox", argv=(
                        "sh", "-c", f"echo {n}-{i}; echo e{n} >&2; exit {i % 3}")))
                    got = (r.status.value, r.exit_code, r.stdout, r.stderr)
                    want = ("ok" if i % 3 == 0 else "nonzero_exit", i % 3,
                            f"{n}-{i}\n".encode(), f"e{n}\n".encode())
                    if got != want:
                        wrong.append(f"client {n} job {i}: {got} != {want}")
        except Exception as e:  # noqa: BLE001 - reported by the test
            wrong.append(f"client {n}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wrong


def _hostile_once(path: Path, kind: str, n: int) -> None:
    """One hostile client of ``kind``; whatever the daemon answers is fine, as long as it
    answers the others."""
    with Raw(path, timeout=60) as raw:
        if kind == "garbage":  # each a fatal error, then the daemon hangs up
            raw.send([b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n",
                      struct.pack(">I", 1 << 31), frame({"t": "run", "id": 1, "spec": {}}),
                      frame([1, 2, 3]), frame({"t": "hello", "version": 99})][n % 6])
            while raw.sock.recv(65536):
                pass
        elif kind == "disconnect_mid_job":
            raw.send(HELLO + run_frame(1, "sh", "-c", "echo up; sleep 1000"))
            raw.until(Output, 1)
        elif kind == "half_frame":
            raw.send(HELLO + run_frame(1, "true")[:7])
        elif kind == "flood_unread":  # requests and output it never reads, then it leaves
            raw.send(HELLO + b"".join(frame({"t": "ping", "id": i}) for i in range(2000)))
            raw.send(run_frame(5000, "head", "-c", "3000000", "/dev/zero"))
        elif kind == "bad_requests":
            raw.hello()
            raw.send(frame({"t": "run", "id": 1, "spec": {"image": "busybox", "argv": 7}})
                     + frame({"t": "cancel", "id": 99}) + frame({"t": "stdin", "id": 98})
                     + run_frame(2, "true") + run_frame(2, "true")
                     + frame({"t": "run", "id": 3, "spec": {"image": "nope", "argv": ["x"]}}))
            assert raw.until(ErrorReply, 1) is not None
            raw.until(JobFinished, 2)


HOSTILE_KINDS = ["garbage", "disconnect_mid_job", "half_frame", "flood_unread", "bad_requests"]


def test_many_clients_with_hostile_ones_among_them(tmp_path: Path, root_runner: Runner) -> None:
    """Twelve well-behaved clients run 25 jobs each while other clients, over and over,
    send garbage, disconnect mid-job, leave half a frame, flood requests and output they
    never read, and send bad requests."""
    d = start_daemon(tmp_path, "--pool", "2", "--warm", "busybox", "--max-running", "4")
    done = threading.Event()
    hostile_runs: list[str] = []
    hostile_errors: list[str] = []

    def hostile(kind: str) -> None:
        n = 0
        while not done.is_set():
            try:
                _hostile_once(d.path, kind, n)
            except (OSError, AssertionError) as e:  # a reset is fine; a hang is not
                if isinstance(e, TimeoutError):
                    hostile_errors.append(f"{kind}: the daemon did not answer")
            hostile_runs.append(kind)
            n += 1

    threads = [threading.Thread(target=hostile, args=(k,)) for k in HOSTILE_KINDS]
    for t in threads:
        t.start()
    try:
        wrong = _bystanders(d.path, clients=12, jobs=25)
    finally:
        done.set()
        for t in threads:
            t.join()
    try:
        assert wrong == [], wrong[:10]
        assert hostile_errors == [], hostile_errors[:5]
        assert all(k in hostile_runs for k in HOSTILE_KINDS), set(hostile_runs)
        with d.client() as client:
            deadline = time.monotonic() + 30
            while client.list_jobs()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.list_jobs()["running"] == [] and client.list_jobs()["queued"] == []
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    assert "Traceback" not in d.log.read_text()


def test_clients_wait_for_a_full_accept_backlog(tmp_path: Path, root_runner: Runner) -> None:
    """Another client can fill the daemon's accept backlog (connecting faster than the
    daemon accepts): a client with a timeout must wait for its turn, not give up at once
    with EAGAIN. The daemon is stopped (SIGSTOP) while the backlog is filled."""
    d = start_daemon(tmp_path, "--pool", "0")
    fillers: list[socket.socket] = []
    results: list[object] = []
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            while True:
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                fillers.append(s)
                s.connect(str(d.path))
        except BlockingIOError:
            pass  # full

        def sync_client() -> None:
            try:
                with Client(d.path, mode="daemon", timeout=120) as client:
                    results.append(client.run(JobSpec(image="busybox", argv=("echo", "s"))))
            except Exception as e:  # noqa: BLE001 - reported by the test
                results.append(e)

        def async_client() -> None:
            async def main() -> object:
                async with AsyncClient(d.path) as client:
                    return await client.run(JobSpec(image="busybox", argv=("echo", "a")))
            try:
                results.append(trio.run(main))
            except Exception as e:  # noqa: BLE001 - reported by the test
                results.append(e)

        threads = [threading.Thread(target=f) for f in (sync_client, async_client)]
        for t in threads:
            t.start()
        time.sleep(1)  # both are trying to connect now
        for s in fillers:
            s.close()
        fillers.clear()
        os.kill(d.proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(120)
        outputs = sorted(getattr(r, "stdout", repr(r)) for r in results)
        assert outputs == [b"a\n", b"s\n"], results
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        for s in fillers:
            s.close()
        assert d.stop() == 0, d.log.read_text()[-3000:]
