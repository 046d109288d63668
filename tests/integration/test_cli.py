"""The CLI behaves like a Unix tool: stdin streams, large inputs travel in bounded pieces,
a closed pipe and Ctrl-C end it quietly, output is exact, every option says what it does.
Each behaviour with and without a daemon (the CLI's two routes)."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import click
import pytest
import trio

from sandbox.cli import cli
from sandbox.client import AsyncClient, Client
from sandbox.errors import SandboxError, SpecError
from sandbox.spec import JobSpec
from tests.conftest import NO_DAEMON, SANDBOX, Daemon, exec_result


@pytest.fixture(params=["embedded", "daemon"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a CLI run without a daemon, or through a session's daemon."""
    base = {**os.environ, **NO_DAEMON}
    if request.param == "daemon":
        daemon: Daemon = request.getfixturevalue("root_daemon")
        base["SANDBOX_SOCKET"] = str(daemon.path)
    return base


def _sh(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[
        bytes]:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True,
                          timeout=timeout, check=False)


def test_stdin_streams_and_ends_with_the_job(env: dict[str, str], no_leaks: None) -> None:
    for flag in ("-i", "--stdin -"):
        t0 = time.monotonic()
        r = _sh(f"yes | {SANDBOX} exec {flag} --image busybox head -1; "
                "echo status=${PIPESTATUS[1]}", env, timeout=60)
        assert (r.stdout, r.stderr) == (b"y\nstatus=0\n", b""), r
        assert time.monotonic() - t0 < 30


def test_a_gigabyte_of_stdin_piped_or_from_a_file(env: dict[str, str], shared_tmp: Path,
                                                  no_leaks: None) -> None:
    r = _sh(f"head -c 1G /dev/zero | {SANDBOX} exec -i --image busybox wc -c; "
            "echo status=${PIPESTATUS[1]}", env, 300)
    assert r.stdout.split() == [b"1073741824", b"status=0"], r.stderr
    big = shared_tmp / "big.in"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: quick to make, a gigabyte to read
    big.chmod(0o644)
    r = _sh(f"{SANDBOX} exec --stdin {big} --image busybox wc -c", env, 300)
    assert (r.returncode, r.stdout.strip()) == (0, b"1073741824"), r.stderr


def test_a_200_mb_file(env: dict[str, str], shared_tmp: Path, no_leaks: None) -> None:
    data = os.urandom(1 << 20) * 200
    path = shared_tmp / "big.bin"
    path.write_bytes(data)
    path.chmod(0o644)
    r = _sh(f"{SANDBOX} exec --json --disk 300M --memory 600M --file {path} --image busybox "
            f"sha256sum big.bin", env, 300)
    result = exec_result(r)
    import hashlib

    assert result["stdout"].split()[0] == hashlib.sha256(data).hexdigest(), result


def test_a_closed_pipe_ends_it_quietly(env: dict[str, str], no_leaks: None) -> None:
    r = _sh(f"{SANDBOX} exec --image busybox sh -c 'yes' | head -1; "
            "echo status=${PIPESTATUS[0]}", {**env}, timeout=60)
    assert r.stdout == b"y\nstatus=141\n" and r.stderr == b"", r


def test_ctrl_c_is_one_line_130_and_leaves_nothing(env: dict[str, str], no_leaks: None) -> None:
    proc = subprocess.Popen([SANDBOX, "exec", "--image", "busybox", "sh", "-c",
                             "echo up; sleep 60"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (130, b"sandbox: interrupted\n"), (out, err)


def test_binary_output_is_exact(env: dict[str, str], shared_tmp: Path,
                                no_leaks: None) -> None:
    blob = bytes(range(256)) * 4
    (shared_tmp / "blob").write_bytes(blob)
    (shared_tmp / "blob").chmod(0o644)
    r = _sh(f"{SANDBOX} exec --file {shared_tmp / 'blob'} --image busybox cat blob", env)
    assert r.stdout == blob, r.stderr
    r = _sh(f"{SANDBOX} exec --json --file {shared_tmp / 'blob'} --image busybox sh -c "
            "'cat blob; echo text >&2'", env)
    result = json.loads(r.stdout)
    assert (result["stdout_encoding"], result["stderr_encoding"]) == ("base64", "utf-8")
    assert base64.b64decode(result["stdout"]) == blob and result["stderr"] == "text\n"


def test_the_spinner_is_gone_before_the_jobs_output(no_leaks: None) -> None:
    """On a terminal (stdout and stderr a pty), nothing but the job's output appears."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([SANDBOX, "exec", "--image", "busybox", "sh", "-c",
                             "echo first; sleep 0.5; echo second"],
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, **NO_DAEMON, "TERM": "xterm"})
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    assert seen == b"first\r\nsecond\r\n", seen


def test_kill_a_job_that_ps_shows(root_daemon: Daemon) -> None:
    env = {**os.environ, **NO_DAEMON, "SANDBOX_SOCKET": str(root_daemon.path)}
    job = subprocess.Popen([SANDBOX, "exec", "--image", "busybox", "sh", "-c",
                            "echo up; sleep 60"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert job.stdout is not None and job.stdout.readline() == b"up\n"
    listing = json.loads(subprocess.run([SANDBOX, "ps", "--json"], env=env,
                                        capture_output=True, check=True).stdout)
    (running,) = [j for j in listing["running"] if "sleep 60" in j["command"]]
    r = subprocess.run([SANDBOX, "kill", running["id"]], env=env, capture_output=True)
    assert (r.returncode, r.stdout.decode()) == (0, running["id"] + "\n"), r
    _, err = job.communicate(timeout=30)
    assert job.returncode == 137 and b"killed by signal 9" in err, err
    r = subprocess.run([SANDBOX, "kill", "no-such-job"], env=env, capture_output=True)
    assert r.returncode == 125 and r.stderr.decode().strip() == (
        "sandbox: error: no job 'no-such-job' (see `sandbox ps`)"), r
    with Client(root_daemon.path, mode="daemon") as client, pytest.raises(SandboxError,
                                                                          match="no job"):
        client.kill("no-such-job")


def test_async_client_without_a_daemon(root_runner: object) -> None:
    async def main() -> list[bytes]:
        async def chunks() -> object:
            for part in (b"one\n", b"two\n"):
                yield part

        async with AsyncClient("/nonexistent/sandbox.sock") as client:
            assert client.embedded
            out: list[bytes] = []
            async with trio.open_nursery() as nursery:
                async def run(spec: JobSpec, stdin: object = None) -> None:
                    result = await client.run(spec, stdin=stdin)  # type: ignore[arg-type]
                    out.append(result.stdout)
                nursery.start_soon(run, JobSpec(image="busybox", argv=("echo", "a")))
                nursery.start_soon(run, JobSpec(image="busybox", argv=("cat",)), chunks())
            return sorted(out)

    assert trio.run(main) == [b"a\n", b"one\ntwo\n"]


def test_a_compilers_command_line_runs_and_a_too_long_one_is_refused(
        root_runner: object) -> None:
    args = [f"-D{'x' * 196}{i:04}" for i in range(2000)]  # 2,000 arguments of 200 bytes
    r = subprocess.run([SANDBOX, "exec", "--json", "--image", "busybox", "sh", "-c",
                        'echo $#', *args], env={**os.environ, **NO_DAEMON},
                       capture_output=True, timeout=120)
    assert json.loads(r.stdout)["stdout"] == "1999\n", r.stderr
    with Client(mode="embedded") as client, pytest.raises(SpecError,
                                                          match="the kernel's limit"):
        client.run(JobSpec(image="busybox", argv=("true", *(["y" * 200] * 12000))))


def test_every_option_says_what_it_does() -> None:
    missing: list[str] = []

    def walk(command: click.Command, path: str) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")
            return
        missing.extend(f"{path} {'/'.join(p.opts)}" for p in command.params
                       if isinstance(p, click.Option) and not p.help)

    walk(cli, "sandbox")
    assert missing == []


@pytest.mark.parametrize("args", [["doctor", "--json"], ["profile", "list", "--json"]])
def test_json_for_scripts(args: list[str]) -> None:
    r = subprocess.run([SANDBOX, *args], env={**os.environ, **NO_DAEMON},
                       capture_output=True, timeout=120)
    data = json.loads(r.stdout)
    if args[0] == "doctor":
        assert r.returncode == 0 and data["ok"] is True
        assert {c["name"].split()[0] for c in data["checks"]} >= {"cgroups", "seccomp"}
    else:
        assert {"default", "build"} <= {p["name"] for p in data}
