"""Shared fixtures: the CLI as root and as an unprivileged user, images, the probe, and a
leak check after every test that runs sandboxes.

Capability probes never silently skip: if this host cannot run sandboxes the tests fail
(set SANDBOX_TESTS_ALLOW_SKIP=1 to skip instead, e.g. on a laptop without delegation).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import v1
from sandbox.client import Client
from tests import cgroupfs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SANDBOX = str(VENV_BIN / "sandbox")
TEST_USER = "sandbox-test"
ALLOW_SKIP = os.environ.get("SANDBOX_TESTS_ALLOW_SKIP") == "1"


def need(condition: bool, why: str) -> None:
    if condition:
        return
    if ALLOW_SKIP:
        pytest.skip(why)
    pytest.fail(f"this host cannot run the test: {why} (SANDBOX_TESTS_ALLOW_SKIP=1 skips)")


def exec_result(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The JSON object `sandbox exec --json` printed, with the CLI's exit code as
    ``cli_exit``; an AssertionError quoting stderr if it printed none."""
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from sandbox exec (exit {proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace')}") from None
    result["cli_exit"] = proc.returncode
    return result


@dataclass
class Runner:
    """Runs the `sandbox` CLI as ``user`` (None: the test process's own user)."""

    user: str | None
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.user or pwd.getpwuid(os.getuid()).pw_name

    def store(self) -> Path:
        """This runner's image store (what `sandbox` uses as $SANDBOX_HOME)."""
        home = self.env.get("SANDBOX_HOME") or (
            os.environ.get("SANDBOX_HOME") if self.user is None else None)
        return Path(home) if home else self.home / ".local" / "share" / "sandbox"

    def command(self, args: list[str], extra_env: dict[str, str] | None = None) -> list[str]:
        if self.user is None:
            return [SANDBOX, *args]
        env = [f"{k}={v}" for k, v in {**self.env, **(extra_env or {})}.items()]
        return ["runuser", "-u", self.user, "--", "env", "-i", *env, SANDBOX, *args]

    def run(self, args: list[str], *, input: bytes | None = None, timeout: float = 120,
            check: bool = False, pass_fds: tuple[int, ...] = (),
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        env = None if self.user is not None else {**os.environ, **self.env, **(extra_env or {})}
        proc = subprocess.run(self.command(args, extra_env), input=input, capture_output=True,
                              timeout=timeout, env=env, pass_fds=pass_fds, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"sandbox {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    def exec(self, *args: str, image: str = "busybox", input: bytes | None = None,
             timeout: float = 120, pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
        """`sandbox exec --json --image IMAGE ARGS...` -> the parsed result object."""
        proc = self.run(["exec", "--json", "--image", image, *args], input=input,
                        timeout=timeout, pass_fds=pass_fds)
        return exec_result(proc)

    def sh(self, script: str, *extra: str, image: str = "busybox", **kw: Any) -> dict[str, Any]:
        return self.exec(*extra, "sh", "-c", script, image=image, **kw)


def _ensure_image(runner: Runner, name: str) -> None:
    listing = runner.run(["images", "--json"], check=True)
    if any(i["name"] == f"{name}:latest" for i in json.loads(listing.stdout)):
        return
    runner.run(["image", "build", name], timeout=900, check=True)


# Runners use the embedded supervisor unless a test points them at a daemon it started: a
# daemon the developer left running (perhaps older code) must not answer for the tests.
# Nothing is pulled from a real registry (tests reach only loopback); the registry tests
# turn pulls back on for their loopback registries.
NO_DAEMON = {"SANDBOX_SOCKET": "/nonexistent/sandbox-tests.sock", "SANDBOX_PULL": "never"}
os.environ["SANDBOX_PULL"] = "never"


@pytest.fixture(scope="session")
def root_runner() -> Runner:
    """The CLI as the user running the tests (root in CI), with its default image store."""
    runner = Runner(None, Path.home(), env=dict(NO_DAEMON))
    _ensure_image(runner, "busybox")
    return runner


def _create_test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(TEST_USER)


def _ensure_subids(user: str) -> None:
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        text = Path(path).read_text() if Path(path).exists() else ""
        if not any(line.split(":")[0] == user for line in text.splitlines()):
            subprocess.run(["usermod", flag, "300000-365535", user], check=True,
                           capture_output=True)


def _v1_subtrees(user: str) -> list[Path]:
    """``sandbox system setup --user USER``'s cgroup v1 directories, one per controller."""
    found = cgroupfs.HIERARCHIES
    return [found[c] / v1.SUBTREE / user for c in v1.CONTROLLERS if c in found]


def _user_manager(pw: pwd.struct_passwd) -> Iterator[None]:
    """On a pure cgroup v2 host run by systemd, sandbox asks the user's systemd manager for
    a delegated scope; a user with no session has none, so `loginctl enable-linger` keeps
    one running for the tests (and disable-linger stops it again, if we enabled it)."""
    if not (cgroupfs.V2 and cgroupfs.SYSTEMD):
        yield
        return
    lingering = Path(f"/var/lib/systemd/linger/{pw.pw_name}").exists()
    if not lingering:
        subprocess.run(["loginctl", "enable-linger", pw.pw_name], check=True)
    private = Path(f"/run/user/{pw.pw_uid}/systemd/private")
    assert cgroupfs.wait_until(private.exists, 60), f"no user manager for {pw.pw_name}"
    yield
    if not lingering:
        subprocess.run(["loginctl", "disable-linger", pw.pw_name], check=True)


def root_only(why: str) -> None:
    """Skip, saying why, when the suite runs as an unprivileged user (as in the pure
    cgroup v2 guest's login session, where its own runs are the rootless ones)."""
    if os.geteuid() != 0:
        pytest.skip(f"the tests run unprivileged (their own runs are the rootless ones), "
                    f"and {why}")


@pytest.fixture(scope="session")
def user_runner() -> Iterator[Runner]:
    """The CLI as an unprivileged user created for the tests (rootless for real). The
    user's cgroup subtree goes again at the end of the session if the session made it."""
    root_only("creating another user takes root")
    need(shutil.which("runuser") is not None, "runuser is missing")
    pw = _create_test_user()
    _ensure_subids(TEST_USER)
    made = [p for p in _v1_subtrees(TEST_USER) if not p.exists()] if cgroupfs.V1 else []
    subprocess.run([SANDBOX, "system", "setup", "--user", TEST_USER], check=True,
                   capture_output=True)
    manager = _user_manager(pw)
    next(manager)
    home = Path(pw.pw_dir)
    env = {"HOME": str(home), "USER": TEST_USER, "LOGNAME": TEST_USER,
           "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
           **NO_DAEMON}
    if store := os.environ.get("SANDBOX_TEST_USER_HOME"):  # a store of its own per checkout
        env["SANDBOX_HOME"] = store
    runner = Runner(TEST_USER, home, env=env)
    _ensure_image(runner, "busybox")
    yield runner
    next(manager, None)
    for path in made:  # empty by now: every job's cgroup below it was removed
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()
        with contextlib.suppress(OSError):  # still holds other users' subtrees
            path.parent.rmdir()


@pytest.fixture(params=["root", "user"])
def runner(request: pytest.FixtureRequest) -> Runner:
    """Each isolation test runs twice: as root and as an unprivileged user."""
    fixture = "root_runner" if request.param == "root" else "user_runner"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def py3(root_runner: Runner) -> Runner:
    """The CLI as root, with the py3 image."""
    _ensure_image(root_runner, "py3")
    return root_runner


@pytest.fixture(scope="session")
def user_py3(user_runner: Runner) -> Runner:
    """The CLI as the unprivileged user, with py3 built rootless by that user."""
    _ensure_image(user_runner, "py3")
    return user_runner


@pytest.fixture(params=["root", "user"])
def runner_py3(request: pytest.FixtureRequest) -> Runner:
    """Like `runner`, with the py3 image available."""
    return request.getfixturevalue(  # type: ignore[no-any-return]
        "py3" if request.param == "root" else "user_py3")


@pytest.fixture(scope="session")
def probe() -> Iterator[Path]:
    """tests/probe/probe.c compiled statically, in a directory the unprivileged user can
    read (pytest's own tmp dirs are private to root)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    need(cc is not None, "a C compiler (gcc) is needed to build the probe")
    out_dir = Path(tempfile.mkdtemp(prefix="sandbox-probe-"))
    out_dir.chmod(0o755)
    out = out_dir / "probe"
    subprocess.run([str(cc), "-static", "-O2", "-o", str(out), str(REPO / "tests/probe/probe.c")],
                   check=True, capture_output=True)
    out.chmod(0o755)
    yield out
    shutil.rmtree(out_dir)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory the unprivileged test user can read (pytest's are private)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# ------------------------------------------------------------------ daemons


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    path: Path
    log: Path
    user: str | None = None

    def client(self) -> Client:
        return Client(self.path, mode="daemon")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon itself (under runuser, runuser's child: runuser does not
        forward signals) and return its exit status."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if self.user and children.exists():
            for child in children.read_text().split():
                os.kill(int(child), sig)
        else:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def start_daemon(directory: Path, *args: str, user: str | None = None,
                 env: dict[str, str] | None = None) -> Daemon:
    path = directory / "sandbox.sock"
    log = directory / "daemon.log"
    cmd = [SANDBOX, "daemon", "--socket", str(path), *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", "env", "-i",
               *[f"{k}={v}" for k, v in (env or {}).items()], *cmd]
    with open(log, "wb") as f:  # (``env`` is the whole environment of another user's daemon)
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, env=env if user is None else None)
    daemon = Daemon(proc, path, log, user)
    deadline = time.monotonic() + 30
    while "event=listening" not in log.read_text():  # (a probe from root would be refused)
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                daemon.stop(signal.SIGKILL)
            raise AssertionError(f"daemon did not start: {log.read_text()}")
        time.sleep(0.02)
    return daemon


@pytest.fixture(scope="session")
def root_daemon(root_runner: Runner) -> Iterator[Daemon]:
    """A daemon as the test process's user, for the whole session (hostile suite route)."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
    d = start_daemon(directory, "--pool", "2", "--warm", "busybox")
    yield d
    d.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def user_daemon(user_runner: Runner) -> Iterator[Daemon]:
    """A daemon run by the unprivileged test user, for the whole session."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-daemon-"))
    directory.chmod(0o777)
    d = start_daemon(directory, "--pool", "2", "--warm", "busybox", user=TEST_USER,
                     env=user_runner.env)
    yield d
    d.stop()
    shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------ leak checking


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    """Make the test process a child subreaper: any process our tests start that outlives
    its parent (a leaked job, a stray daemon) is reparented to us and shows up as our child,
    whoever else is running sandboxes on this machine."""
    from sandbox import linux

    linux.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _sandbox_mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if " - overlay " in line or "/sandbox-" in line.split()[4]]


def _children() -> list[str]:
    """Our children after reaping the ones that exited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    me = str(os.getpid())
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                cmd = (entry / "cmdline").read_bytes()[:100].replace(b"\0", b" ")
                out.append(f"{entry.name} {cmd.decode(errors='replace')}")
    return out


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it left a cgroup, a mount or a process behind (processes that were
    already our children, such as session-wide registries, do not count)."""
    before = set(_children())
    yield
    import time

    for _ in range(50):  # cleanup of the last job may still be finishing
        leaked = (cgroupfs.stale_cgroups(), _sandbox_mounts(), sorted(set(_children()) - before))
        if not any(leaked):
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: cgroups={leaked[0]} mounts={leaked[1]} "
                         f"processes={leaked[2]}")
