"""The daemon: concurrent clients, cancellation, disconnects, garbage, admission, the warm
pool, SIGTERM and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandbox import framing
from sandbox.client import AsyncClient, Client
from sandbox.errors import DaemonError, SandboxError
from sandbox.spec import JobSpec, Limits
from tests import cgroupfs
from tests.conftest import SANDBOX, TEST_USER, Daemon, Runner, start_daemon

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def daemon(tmp_path: Path, root_runner: Runner) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, "--pool", "2", "--warm", "busybox")
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0, d.log.read_text()
    assert not d.path.exists(), "the socket was not removed"


def spec(*argv: str, **kw: object) -> JobSpec:
    return JobSpec(image="busybox", argv=argv, **kw)  # type: ignore[arg-type]


def test_cli_uses_the_daemon(daemon: Daemon, shared_tmp: Path) -> None:
    """The fast path of `sandbox exec` behaves like the full CLI."""
    def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([SANDBOX, "exec", *args], capture_output=True, check=False,
                              input=stdin, env={**os.environ, "SANDBOX_SOCKET": str(daemon.path)})

    proc = cli("--json", "--image", "busybox", "sh", "-c", "echo $((6*7))")
    result = json.loads(proc.stdout)
    assert (result["status"], result["stdout"], proc.returncode) == ("ok", "42\n", 0)
    assert "job_done" in daemon.log.read_text()  # it really went through the daemon
    proc = cli("--image", "busybox", "sh", "-c", "echo out; echo err >&2; kill -TERM $$")
    assert (proc.stdout, proc.returncode) == (b"out\n", 128 + 15)
    assert proc.stderr.startswith(b"err\nsandbox: killed by signal 15")
    script = shared_tmp / "prog"
    script.write_text("#!/bin/sh\necho args: \"$@\"; cat\n")
    script.chmod(0o755)
    proc = cli("--image", "busybox", "--stdin", "-", str(script), "a", "b", stdin=b"in\n")
    assert (proc.stdout, proc.returncode) == (b"args: a b\nin\n", 0)
    for bad in (["--image", "no-such-image", "true"], ["--memory", "lots", "true"],
                ["--image", "busybox", "--profile", "nope", "true"]):
        proc = cli(*bad)
        assert proc.returncode == 125, bad
        assert len(proc.stderr.splitlines()) == 1 and b"Traceback" not in proc.stderr


@pytest.mark.cgroups
def test_client_run_with_limits(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert not client.embedded
        r = client.run(spec("sh", "-c", "while :; do :; done", limits=Limits(time=0.5)))
        assert (r.status.value, r.signal) == ("time_limit", 9)
        r = client.run(spec("sh", "-c", "echo out; echo err >&2; exit 3"))
        assert (r.status.value, r.exit_code, r.stdout, r.stderr) == ("nonzero_exit", 3,
                                                                     b"out\n", b"err\n")
        assert client.ping() < 1
        assert client.version()["protocol"] == 1


def test_bad_spec_is_an_error_for_that_job_only(daemon: Daemon) -> None:
    with daemon.client() as client:
        with pytest.raises(SandboxError, match="not found"):
            client.run(JobSpec(image="no-such-image", argv=("true",)))
        assert client.run(spec("true")).status.value == "ok"


@pytest.mark.cgroups
def test_concurrent_clients(daemon: Daemon) -> None:
    results: dict[int, bytes] = {}

    def worker(n: int) -> None:
        with daemon.client() as client:
            for i in range(5):
                r = client.run(spec("sh", "-c", f"echo {n}-{i}"))
                results[n * 10 + i] = r.stdout

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n * 10 + i: f"{n}-{i}\n".encode() for n in range(4) for i in range(5)}


def run_at_once(path: Path, n: int, script: str) -> list[bytes]:
    """Run ``n`` jobs ``sh -c SCRIPT`` at once over one connection (``{i}`` in ``script``
    is the job's number); their stdouts, after checking that nothing is left running."""
    async def main() -> list[bytes]:
        outputs: list[bytes] = [b""] * n
        async with AsyncClient(path) as client:
            async def one(i: int) -> None:
                r = await client.run(spec("sh", "-c", script.format(i=i)))
                outputs[i] = r.stdout

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            listing = await client.list_jobs()
            assert listing["running"] == [] and listing["queued"] == []
        return outputs

    return trio.run(main)


def test_many_jobs_over_one_connection(daemon: Daemon) -> None:
    outputs = run_at_once(daemon.path, 20, "sleep 0.0$(({i} % 5)); echo {i}")
    assert outputs == [f"{i}\n".encode() for i in range(20)]


def test_output_streams_as_it_is_written(daemon: Daemon) -> None:
    async def main() -> list[tuple[float, bytes]]:
        arrivals: list[tuple[float, bytes]] = []
        async with AsyncClient(daemon.path) as client:
            await client.run(spec("sh", "-c", "echo first; sleep 1; echo second"),
                             on_output=lambda s, d: arrivals.append((time.monotonic(), d)))
            arrivals.append((time.monotonic(), b"<done>"))
        return arrivals

    arrivals = trio.run(main)
    assert [d for _, d in arrivals] == [b"first\n", b"second\n", b"<done>"]
    assert arrivals[2][0] - arrivals[0][0] >= 0.9  # the first line came before the end


def test_stdin_stream(daemon: Daemon) -> None:
    async def main() -> bytes:
        async def lines() -> object:
            for i in range(3):
                yield f"line {i}\n".encode()
                await trio.sleep(0.05)

        async with AsyncClient(daemon.path) as client:
            r = await client.run(spec("sh", "-c", "cat; echo end"),
                                 stdin=lines())  # type: ignore[arg-type]
        return r.stdout

    assert trio.run(main) == b"line 0\nline 1\nline 2\nend\n"


def _job_processes(marker: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    out.append(p.name)
            except OSError:
                continue
    return out


def _wait_gone(marker: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _job_processes(marker), f"job {marker} still running"


def test_cancel(daemon: Daemon) -> None:
    marker = f"cancelme{os.getpid()}"

    async def main() -> object:
        async with AsyncClient(daemon.path) as client, trio.open_nursery() as n:
            result: list[object] = []

            async def run() -> None:
                result.append(await client.run(spec("sh", "-c", f"sleep 30; : {marker}")))

            n.start_soon(run)
            with trio.fail_after(20):
                while not _job_processes(marker):  # noqa: ASYNC110 - polling /proc
                    await trio.sleep(0.02)
            await client.cancel(1)
        return result[0]

    started = time.monotonic()
    r = trio.run(main)
    assert time.monotonic() - started < 10
    assert (r.status.value, r.signal, r.message) == ("signaled", 9, "cancelled")  # type: ignore[attr-defined]
    _wait_gone(marker)


def _raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    return s


def _frame(obj: dict[str, object]) -> bytes:
    import msgpack

    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_disconnect_kills_the_clients_jobs(daemon: Daemon) -> None:
    marker = f"orphan{os.getpid()}"
    s = _raw_connect(daemon.path)
    s.sendall(_frame({"t": "hello", "version": 1}) + _frame(
        {"t": "run", "id": 1, "spec": spec("sh", "-c", f"sleep 30; : {marker}").to_dict()}))
    deadline = time.monotonic() + 10
    while not _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _job_processes(marker)
    s.close()
    _wait_gone(marker)
    with daemon.client() as client:
        deadline = time.monotonic() + 5
        while client.list_jobs()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.list_jobs()["running"] == []


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x05hello",                       # a frame that is not msgpack
    struct.pack(">I", 1 << 31) + b"x" * 100,        # oversized
    _frame({"t": "run", "id": 1, "spec": {}}),      # no handshake first
    _frame({"t": "hello", "version": 99}),          # unknown protocol version
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_garbage_gets_an_error_and_others_carry_on(daemon: Daemon, garbage: bytes) -> None:
    with daemon.client() as bystander:
        s = _raw_connect(daemon.path)
        s.settimeout(10)
        s.sendall(garbage)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        assert b"error" in reply  # a fatal error reply, then the daemon hung up
        assert bystander.run(spec("echo", "fine")).stdout == b"fine\n"
    assert daemon.proc.poll() is None


def _frames_until_eof(s: socket.socket) -> list[dict[str, object]]:
    reader, out = framing.FrameReader(), []
    while chunk := s.recv(65536):
        reader.feed(chunk)
        while (message := reader.next()) is not None:
            out.append(message)
    return out


@pytest.mark.parametrize("version", [1, 99])
def test_requests_may_follow_hello_without_waiting_for_welcome(daemon: Daemon,
                                                               version: int) -> None:
    """What `sandbox exec` does to save a round trip: hello and run in one write. Behind a
    hello the daemon refuses, nothing runs."""
    marker = f"pipelined-{os.getpid()}-{version}"
    s = _raw_connect(daemon.path)
    s.settimeout(30)
    job = {"image": "busybox", "argv": ["sh", "-c", f"echo {marker}"]}
    s.sendall(framing.encode({"t": "hello", "version": version, "client": "test"})
              + framing.encode({"t": "run", "id": 1, "spec": job})
              + framing.encode({"t": "ping", "id": 2}))
    if version == 1:
        got: list[dict[str, object]] = []
        reader = framing.FrameReader()
        while not any(m.get("t") == "result" for m in got):
            chunk = s.recv(65536)
            assert chunk, f"the daemon hung up: {got}"
            reader.feed(chunk)
            while (message := reader.next()) is not None:
                got.append(message)
        s.close()
        kinds = [m["t"] for m in got]
        assert kinds[0] == "welcome" and "pong" in kinds, kinds
        result = next(m for m in got if m["t"] == "result")["result"]
        assert result["status"] == "ok", result  # type: ignore[index]
        assert marker.encode() in b"".join(m["data"] for m in got  # type: ignore[misc]
                                            if m["t"] == "output"), got
    else:
        got = _frames_until_eof(s)
        s.close()
        assert [m["t"] for m in got] == ["error"] and got[0]["fatal"], got
        with daemon.client() as c:
            assert not c.list_jobs()["running"] and not c.list_jobs()["queued"]


def test_admission_control_and_queue(tmp_path: Path, root_runner: Runner) -> None:
    d = start_daemon(tmp_path, "--pool", "0", "--max-running", "1", "--max-queued", "1")

    async def main() -> tuple[dict[str, object], list[str]]:
        errors: list[str] = []
        async with AsyncClient(d.path) as client, trio.open_nursery() as n:
            async def run(argv: tuple[str, ...]) -> None:
                try:
                    await client.run(spec(*argv))
                except SandboxError as e:
                    errors.append(str(e))

            n.start_soon(run, ("sleep", "1"))
            await trio.sleep(0.5)
            n.start_soon(run, ("true",))
            await trio.sleep(0.2)
            listing = await client.list_jobs()
            n.start_soon(run, ("true",))  # the queue (1) is full
        return listing, errors

    try:
        listing, errors = trio.run(main)
    finally:
        assert d.stop() == 0
    assert len(listing["running"]) == 1 and len(listing["queued"]) == 1  # type: ignore[arg-type]
    assert listing["limits"]["max_running"] == 1  # type: ignore[index]
    assert errors and "queue is full" in errors[0]


@pytest.mark.parametrize("fair", [False, True])
def test_queued_jobs_start_in_arrival_order_or_take_turns(tmp_path: Path, root_runner: Runner,
                                                          fair: bool) -> None:
    """One slot; connection A queues five jobs, then connection B one. In arrival order B's
    job runs last; with ``--fair`` it runs after at most one more of A's."""
    d = start_daemon(tmp_path, "--pool", "0", "--max-running", "1",
                     *(["--fair"] if fair else []))
    done: list[str] = []

    async def main() -> dict[str, object]:
        async with AsyncClient(d.path) as a, AsyncClient(d.path) as b, \
                trio.open_nursery() as n:
            async def run(client: AsyncClient, name: str, seconds: str) -> None:
                await client.run(spec("sleep", seconds))
                done.append(name)

            for i in range(5):
                n.start_soon(run, a, f"a{i}", "0.3")
            await trio.sleep(0.15)  # a0 runs, a1..a4 wait
            n.start_soon(run, b, "b", "0")
            await trio.sleep(0.05)
            return await a.list_jobs()

    try:
        listing = trio.run(main)
    finally:
        assert d.stop() == 0
    assert listing["limits"]["fair"] == int(fair)  # type: ignore[index]
    assert sorted(done) == ["a0", "a1", "a2", "a3", "a4", "b"]
    if fair:
        assert done.index("b") <= 2, done
    else:
        assert done[-1] == "b", done


def test_ps_shows_running_jobs_and_the_queue_order(tmp_path: Path, root_runner: Runner) -> None:
    d = start_daemon(tmp_path, "--pool", "0", "--fair")
    env = {**os.environ, "SANDBOX_SOCKET": str(d.path)}
    job = subprocess.Popen([SANDBOX, "exec", "--image", "busybox", "sh", "-c",
                            "echo up; sleep 30"], env=env, stdout=subprocess.PIPE)
    try:
        assert job.stdout is not None and job.stdout.readline() == b"up\n"
        text = subprocess.run([SANDBOX, "ps"], env=env, capture_output=True, check=True).stdout
        listing = json.loads(subprocess.run([SANDBOX, "ps", "--json"], env=env,
                                            capture_output=True, check=True).stdout)
    finally:
        job.kill()
        job.communicate()
        assert d.stop() == 0
    header, columns, *rows = text.decode().splitlines()
    assert header.startswith("running 1/") and "(taking turns)" in header, text
    assert columns.split() == ["ID", "STATE", "OWNER", "IMAGE", "TIME", "COMMAND"], text
    assert len(rows) == 1 and "running" in rows[0] and "sleep 30" in rows[0], text
    assert listing["limits"]["fair"] == 1 and len(listing["running"]) == 1, listing


def _wait_warm(client: Client) -> None:
    deadline = time.monotonic() + 10
    while client.list_jobs()["pool"]["idle"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.cgroups
def test_warm_pool_gives_each_job_a_fresh_sandbox(daemon: Daemon) -> None:
    with daemon.client() as client:
        _wait_warm(client)
        first = client.run(spec("sh", "-c", "echo x > /work/left; echo y > /tmp/left; "
                                "echo z > /dev/shm/left; ls /proc | grep -c '^[0-9]'"))
        assert first.status.value == "ok"
        _wait_warm(client)
        second = client.run(spec("sh", "-c", "ls -A /work /tmp /dev/shm"))
        assert b"left" not in second.stdout
        assert client.list_jobs()["pool"]["warm_hits"] >= 2


def test_sigterm_kills_and_reports_running_jobs(tmp_path: Path, root_runner: Runner) -> None:
    d = start_daemon(tmp_path, "--pool", "1")
    marker = f"term{os.getpid()}"
    results: list[object] = []

    def run() -> None:
        with d.client() as client:
            results.append(client.run(spec("sh", "-c", f"sleep 60; : {marker}")))

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.stop(signal.SIGTERM) == 0
    t.join(10)
    assert results and results[0].status.value == "internal_error"  # type: ignore[attr-defined]
    assert "shut down" in results[0].message  # type: ignore[attr-defined]
    _wait_gone(marker)
    assert not d.path.exists()


@pytest.mark.cgroups
def test_sigkill_leaves_no_job_and_restart_cleans_up(tmp_path: Path,
                                                     root_runner: Runner) -> None:
    d = start_daemon(tmp_path, "--pool", "2", "--warm", "busybox")
    marker = f"kill{os.getpid()}"
    s = _raw_connect(d.path)
    s.sendall(_frame({"t": "hello", "version": 1}) + _frame(
        {"t": "run", "id": 1, "spec": spec("sh", "-c", f"sleep 60; : {marker}").to_dict()}))
    deadline = time.monotonic() + 10
    while not _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = d.proc.pid
    d.stop(signal.SIGKILL)
    s.close()
    _wait_gone(marker)  # no job outlives its daemon
    stale = cgroupfs.job_cgroups(root_runner.name, pid)
    d2 = start_daemon(tmp_path, "--pool", "0")  # a stale socket is replaced
    try:
        with d2.client() as client:
            assert client.run(spec("true")).status.value == "ok"
        assert not any(p.exists() for p in stale), "a restarted daemon removes stale cgroups"
    finally:
        assert d2.stop() == 0


def test_other_users_are_refused(shared_tmp: Path, root_runner: Runner,
                                 user_runner: Runner) -> None:
    daemon = start_daemon(shared_tmp, "--pool", "0")
    # open the way (the socket is normally 0600 in a 0700 directory) to reach the check
    os.chmod(daemon.path, 0o666)
    hello = _frame({"t": "hello", "version": 1}).hex()
    code = ("import socket; s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({str(daemon.path)!r}); s.sendall(bytes.fromhex({hello!r}))\n"
            "    print(len(s.recv(100)))\n"
            "except (ConnectionResetError, BrokenPipeError):\n    print(0)")
    proc = subprocess.run(["runuser", "-u", TEST_USER, "--", "/usr/bin/python3", "-c", code],
                          capture_output=True, text=True, check=False, timeout=30)
    assert daemon.stop() == 0
    assert proc.stdout.strip() == "0", proc  # the daemon closed without a word
    assert "refused" in daemon.log.read_text()


@pytest.mark.cgroups
def test_daemon_as_unprivileged_user(shared_tmp: Path, user_runner: Runner) -> None:
    os.chmod(shared_tmp, 0o777)
    d = start_daemon(shared_tmp, "--pool", "1", user=TEST_USER, env=user_runner.env)
    try:
        proc = user_runner.run(["exec", "--json", "--image", "busybox", "id", "-u"],
                               extra_env={"SANDBOX_SOCKET": str(d.path)})
        result = json.loads(proc.stdout)
        assert (result["status"], result["stdout"]) == ("ok", "1000\n")
        assert "job_done" in d.log.read_text()
    finally:
        assert d.stop() == 0


def test_client_falls_back_to_embedded(tmp_path: Path, root_runner: Runner) -> None:
    with Client(tmp_path / "nobody-here.sock") as client:
        assert client.embedded
        assert client.run(spec("echo", "embedded")).stdout == b"embedded\n"
    with pytest.raises(DaemonError):
        Client(tmp_path / "nobody-here.sock", mode="daemon")


def test_output_limit_that_fires_before_the_start_is_reported(daemon: Daemon) -> None:
    """A job that floods at once can hit its output limit before init has reported that it
    started it (init does so after the spawn): the verdict is the limit, not a failure."""
    with daemon.client() as client:
        statuses = [client.run(spec("head", "-c", "1000000", "/dev/zero",
                                    limits=Limits(output=1))).status.value for _ in range(40)]
    assert set(statuses) == {"output_limit"}, statuses


def test_daemon_is_not_bound_by_a_low_descriptor_soft_limit(tmp_path: Path,
                                                            root_runner: Runner) -> None:
    """Each running job holds a few descriptors in the daemon; a daemon started with the
    usual soft limit of 1024 (here 64) ran out of them (EMFILE) long before its hard limit.
    It raises its soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        d = start_daemon(tmp_path, "--pool", "0", "--max-running", "30")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    try:
        outputs = run_at_once(d.path, 30, "sleep 1; echo {i}")
        assert outputs == [f"{i}\n".encode() for i in range(30)]
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_large_files_travel_in_pieces_and_the_upload_is_bounded(tmp_path: Path,
                                                                shared_tmp: Path) -> None:
    d = start_daemon(tmp_path, "--pool", "0", "--max-upload", "20M")
    env = {**os.environ, "SANDBOX_SOCKET": str(d.path)}
    try:
        fits, too_big = shared_tmp / "fits.bin", shared_tmp / "too-big.bin"
        fits.write_bytes(b"f" * (17 << 20))  # over 16 MiB: sent in 1 MiB pieces
        too_big.write_bytes(b"t" * (30 << 20))
        for p in (fits, too_big):
            p.chmod(0o644)
        ok = subprocess.run([SANDBOX, "exec", "--json", "--image", "busybox", "--file",
                             str(fits), "wc", "-c", "fits.bin"], env=env, capture_output=True)
        assert json.loads(ok.stdout)["stdout"].split()[0] == str(17 << 20), ok.stderr
        refused = subprocess.run([SANDBOX, "exec", "--image", "busybox", "--file",
                                  str(too_big), "true"], env=env, capture_output=True)
        err = refused.stderr.decode()
        assert refused.returncode == 125 and len(err.strip().splitlines()) == 1, err
        assert "this daemon takes at most 20971520 (sandbox daemon --max-upload)" in err, err
    finally:
        assert d.stop() == 0
