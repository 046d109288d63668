"""Hostile and broken clients of one daemon: clients that stop reading, send garbage,
disconnect mid-job or flood it, while well-behaved clients run jobs next to them. The
well-behaved ones must get every result, and correct; the daemon must carry on."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sandbox.protocol import JobFinished, Output
from sandbox.spec import JobSpec, Limits
from tests.conftest import Runner, start_daemon

from .wire import HELLO, Raw, run_frame

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_a_client_that_stops_reading_holds_no_running_slot(tmp_path: Path,
                                                           root_runner: Runner) -> None:
    """A job whose client does not read its streamed output must still end at its limits
    and give its running slot back: with one slot, a bystander's job must still run."""
    d = start_daemon(tmp_path, "--pool", "0", "--max-running", "1")
    try:
        hog = Raw(d.path)
        hog.send(HELLO + run_frame(1, "head", "-c", "20000000", "/dev/zero",
                                   limits=Limits(output="4M", wall_time=5)))
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
        from sandbox.client import Client

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
