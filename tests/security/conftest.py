"""Fixtures of the hostile suite: the hostile program, the way a job is run (`via`), and the
host-side check that runs after every hostile job.

Every hostile payload runs only inside a sandbox: through `Hostile.exec`/`Hostile.sh`, which
go through `sandbox exec`. Nothing here runs a payload on the host.

`via` says how a job reaches the supervisor: ``exec`` (the CLI with its embedded supervisor)
or ``daemon`` (a session daemon of the runner's user); every hostile test runs through both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SANDBOX, TEST_USER, Runner, exec_result, need, root_only

VIAS = ["exec", "daemon"]


@pytest.fixture(autouse=True)
def _root_test_process() -> None:
    root_only("the host-side checks read /etc/shadow and every process's environment")


@pytest.fixture(scope="session")
def hostile_bin() -> Iterator[Path]:
    """tests/security/hostile.c, static and non-PIE, in a directory every user can read."""
    cc = shutil.which("gcc")
    need(cc is not None, "gcc is needed to build the hostile programs")
    out_dir = Path(tempfile.mkdtemp(prefix="sandbox-hostile-"))
    out_dir.chmod(0o755)
    out = out_dir / "hostile"
    subprocess.run([str(cc), "-static", "-no-pie", "-O1", "-o", str(out),
                    str(REPO / "tests/security/hostile.c")], check=True, capture_output=True)
    out.chmod(0o755)
    yield out
    shutil.rmtree(out_dir)


@dataclass
class Victim:
    """Host things a hostile job must neither read nor change."""

    dir: Path
    secret: str            # the content of dir/secret, world-readable on the host
    canary_pid: int        # a host process of ours (not a child: `no_leaks` counts those)
    canary_pidfd: int
    canary_name: str

    @property
    def secret_file(self) -> Path:
        return self.dir / "secret"

    def canary_alive(self) -> bool:
        return not select.select([self.canary_pidfd], [], [], 0)[0]


@pytest.fixture(scope="session")
def victim() -> Iterator[Victim]:
    """A world-readable host directory with a secret, and a canary process (ours)."""
    base = Path(tempfile.mkdtemp(prefix="sbx-victim-", dir="/var/tmp"))
    base.chmod(0o755)
    secret = f"host-secret-{secrets.token_hex(8)}"
    (base / "secret").write_text(secret + "\n")
    (base / "secret").chmod(0o644)
    (base / "sub").mkdir(mode=0o755)
    (base / "sub" / "file").write_text("data\n")
    name = f"sbx-canary-{secrets.token_hex(4)}"
    starter = ("import subprocess, sys; print(subprocess.Popen([sys.argv[1], '1000000'], "
               "executable='/bin/sleep', start_new_session=True, stdin=subprocess.DEVNULL, "
               "stdout=subprocess.DEVNULL).pid)")
    pid = int(subprocess.check_output([sys.executable, "-c", starter, name]))
    pidfd = os.pidfd_open(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(name.encode())
    yield Victim(base, secret, pid, pidfd, name)
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)
    shutil.rmtree(base)


def _file_digest(path: Path) -> str:
    try:
        st = path.lstat()
    except OSError as e:
        return f"missing:{e.errno}"
    meta = f"{stat.S_IMODE(st.st_mode):o}:{st.st_uid}:{st.st_gid}:{st.st_ctime_ns}"
    if stat.S_ISREG(st.st_mode):
        return meta + ":" + hashlib.sha256(path.read_bytes()).hexdigest()
    return meta


def _tree(root: Path) -> dict[str, str]:
    """Every entry below ``root`` with its mode, owner and change time (content changes and
    chmod/chown both move ctime)."""
    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p)] = f"{stat.S_IMODE(st.st_mode):o}:{st.st_uid}:{st.st_ctime_ns}"
    return out


def _stores() -> list[Path]:
    stores = [Path(os.environ.get("SANDBOX_HOME") or Path.home() / ".local/share/sandbox")]
    user_store = os.environ.get("SANDBOX_TEST_USER_HOME")
    if not user_store:
        with contextlib.suppress(KeyError):
            user_store = f"{pwd.getpwnam(TEST_USER).pw_dir}/.local/share/sandbox"
    if user_store:
        stores.append(Path(user_store))
    return stores


def host_snapshot(victim: Victim) -> dict[str, Any]:
    """What must not change: binaries and host files (content and metadata), the victim's
    tree, the unpacked image layers that existed already, and the modes of a few host
    directories."""
    files = [Path(SANDBOX), Path(os.path.realpath(sys.executable)), Path("/etc/passwd"),
             Path("/etc/shadow"), Path("/etc/hosts"), Path("/bin/sh"), victim.secret_file]
    layers: dict[str, str] = {}
    for store in _stores():
        layer_root = store / "layers"
        if layer_root.is_dir():
            for layer in sorted(layer_root.iterdir()):
                layers.update(_tree(layer))
    dirs = {d: _file_digest(Path(d)).split(":")[:3] for d in
            ("/", "/etc", "/tmp", "/var/tmp", "/root", "/home", "/usr/bin", str(REPO))}
    return {"files": {str(f): _file_digest(f) for f in files}, "victim": _tree(victim.dir),
            "layers": layers, "dirs": dirs}


def processes_with(token: str) -> list[str]:
    """Host processes whose environment carries ``token``: the job's processes (the CLI
    has it only on its command line)."""
    needle = token.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:80]!r}")
        except OSError:
            continue
    return found


@dataclass
class Hostile:
    """Runs hostile jobs through one route (`via`) as one user; marks every job with a token
    in its environment, so that whatever it leaves running can be found on the host."""

    runner: Runner
    via: str
    token: str
    bin: Path
    route: dict[str, str] = field(default_factory=dict)  # SANDBOX_SOCKET for "daemon"

    @property
    def user(self) -> str:
        return self.runner.name

    def exec(self, *args: str, image: str = "busybox", input: bytes | None = None,
             timeout: float = 120, pass_fds: tuple[int, ...] = (),
             extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        """`sandbox exec --json` -> the parsed result (plus ``cli_exit``)."""
        proc = self.runner.run(["exec", "--json", "--image", image,
                                "--env", f"SBX_HOSTILE={self.token}", *args],
                               input=input, timeout=timeout, pass_fds=pass_fds,
                               extra_env={**self.route, **(extra_env or {})})
        result = exec_result(proc)
        result["cli_stderr"] = proc.stderr.decode(errors="replace")
        return result

    def sh(self, script: str, *extra: str, image: str = "busybox", **kw: Any) -> dict[str, Any]:
        return self.exec(*extra, "sh", "-c", script, image=image, **kw)

    def run(self, sub: str, *args: str, opts: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
        """Run a subcommand of the hostile program (copied in as PROGRAM)."""
        return self.exec(*opts, str(self.bin), sub, *args, **kw)

    def command(self, args: list[str]) -> list[str]:
        """The CLI command line for ``args`` (for tests that drive the process themselves)."""
        return self.runner.command(args, self.route)

    def popen_env(self) -> dict[str, str] | None:
        if self.runner.user is not None:
            return None
        return {**os.environ, **self.runner.env, **self.route}


def fields(result: dict[str, Any]) -> dict[str, str]:
    """``name=value`` lines of a hostile program's stdout."""
    out: dict[str, str] = {}
    for line in str(result["stdout"]).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


@pytest.fixture(params=VIAS)
def via(request: pytest.FixtureRequest, runner: Runner) -> tuple[str, dict[str, str]]:
    """The route and the environment that selects it (set up before `no_leaks`, so that a
    session daemon started here is not taken for a leak)."""
    if request.param == "daemon":
        daemon = request.getfixturevalue("root_daemon" if runner.user is None
                                         else "user_daemon")
        return "daemon", {"SANDBOX_SOCKET": str(daemon.path)}
    return str(request.param), {}


@pytest.fixture
def hostile(runner: Runner, via: tuple[str, dict[str, str]], hostile_bin: Path,
            victim: Victim, no_leaks: None) -> Iterator[Hostile]:
    """A `Hostile` for one user and route; afterwards the host must be unharmed: the canary
    alive, files, binaries, image layers and directory modes unchanged, nothing of the job's
    left running (and, through `no_leaks`, no cgroup, mount or child left)."""
    before = host_snapshot(victim)
    h = Hostile(runner, via[0], f"sbx-hostile-{secrets.token_hex(6)}", hostile_bin, via[1])
    yield h
    deadline = time.monotonic() + 10
    while (left := processes_with(h.token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the job left processes running: {left}"
    assert victim.canary_alive(), "the host canary process was killed"
    after = host_snapshot(victim)
    for key in ("files", "victim", "dirs"):
        assert after[key] == before[key], f"host {key} changed"
    changed = {k for k in before["layers"] if after["layers"].get(k) != before["layers"][k]}
    assert not changed, f"image layers changed: {sorted(changed)[:5]}"
