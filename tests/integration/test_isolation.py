"""Each isolation property of `sandbox exec`, tested by a program that tries to break it,
as root and as an unprivileged user."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pyseccomp
import pytest

from tests.conftest import SANDBOX, Runner, exec_result

pytestmark = pytest.mark.usefixtures("no_leaks")

EPERM, ENOSYS, SIGSYS = 1, 38, 31
GLIBC_INTERNAL_SIGNALS = 1 << (32 - 1) | 1 << (33 - 1)  # as bits of SigIgn


def nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def status_fields(r: dict[str, object]) -> dict[str, str]:
    out = {}
    for line in str(r["stdout"]).splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------ users and privileges


def test_runs_as_non_root_with_no_capabilities(runner: Runner) -> None:
    r = runner.exec("cat", "/proc/self/status")
    f = status_fields(r)
    assert f["Uid"].split()[0] == "1000" and f["Gid"].split()[0] == "1000"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(f[cap], 16) == 0, (cap, f[cap])
    assert f["NoNewPrivs"] == "1"
    assert f["Seccomp"] == "2"


def test_signals_ignored_by_the_caller_are_default_in_the_job(runner: Runner) -> None:
    """Ignored dispositions survive exec: a caller (and so the supervisor, the spawner and
    init) started with signals ignored must not hand them to the job."""
    command = runner.command(["exec", "--json", "--image", "busybox", "cat", "/proc/self/status"],
                             {"SANDBOX_SOCKET": "/nonexistent/sandbox-tests.sock"})
    at = command.index(SANDBOX)
    command[at:at] = ["sh", "-c", 'trap "" HUP USR1 USR2 TERM; exec "$@"', "sh"]
    env = None if runner.user else {**os.environ, "SANDBOX_SOCKET": "/nonexistent/x.sock"}
    proc = subprocess.run(command, capture_output=True, timeout=120, env=env, check=False)
    f = status_fields(exec_result(proc))
    # 32 and 33 are glibc's own (SIGCANCEL, SIGSETXID): its posix_spawn ignores them in the
    # child, and no caller can ask otherwise (ARCHITECTURE.md, "Spawning the job").
    assert int(f["SigIgn"], 16) & ~GLIBC_INTERNAL_SIGNALS == 0, f
    assert int(f["SigBlk"], 16) == 0, f


def test_user_namespace_maps_the_caller_and_never_host_root_to_the_job(
        runner: Runner) -> None:
    r = runner.exec("cat", "/proc/self/uid_map")
    lines = [tuple(int(x) for x in line.split()) for line in r["stdout"].splitlines()]
    host_uid = 0 if runner.user is None else int(
        subprocess.check_output(["id", "-u", runner.user]).decode())
    assert any(outside == host_uid for _, outside, _ in lines), lines
    for inside, outside, count in lines:
        if inside <= 1000 < inside + count:  # the job's uid
            assert outside + 1000 - inside != 0, lines


def test_new_session_without_terminal(runner: Runner, probe: Path) -> None:
    # TIOCSTI needs a terminal and the filter forbids it; the job has no controlling tty
    r = runner.sh("read line < /proc/$$/stat; echo $line; (: < /dev/tty) 2>/dev/null; "
                  "echo tty=$?")
    fields = r["stdout"].split(")")[1].split()
    pid, sid = r["stdout"].split()[0], fields[3]
    assert pid == sid, "the job is not the leader of a new session"
    assert "tty=1" in r["stdout"] or "tty=2" in r["stdout"]
    r = runner.exec(str(probe), "tiocsti")
    assert r["exit_code"] == EPERM, r


def test_setuid_binaries_do_not_elevate(runner: Runner) -> None:
    r = runner.sh("cp /bin/busybox /work/busybox && chmod 4755 /work/busybox && "
                  "/work/busybox id -u; mkdir /tmp/x && cp /bin/busybox /tmp/x/busybox && "
                  "chmod 4755 /tmp/x/busybox && /tmp/x/busybox id -u")
    assert r["stdout"].split() == ["1000", "1000"]


# ------------------------------------------------------------------ processes


def test_only_own_processes_are_visible(runner: Runner) -> None:
    r = runner.sh("ls /proc | grep '^[0-9]' | sort -n | tr '\\n' ' '")
    pids = [int(p) for p in r["stdout"].split()]
    # init (1), the shell (2), ls and grep/sort/tr: nothing of the host's
    assert pids[0] == 1 and max(pids) < 20, pids


def test_init_environment_is_unreadable(runner: Runner) -> None:
    r = runner.sh("cat /proc/1/environ; echo rc=$?; ls /proc/1/root/ 2>&1; "
                  "cat /proc/1/maps 2>&1 | head -1")
    assert "rc=1" in r["stdout"]
    assert "Permission denied" in r["stderr"] or "Permission denied" in r["stdout"]
    assert "PATH=" not in r["stdout"]


def test_cannot_signal_or_ptrace_init(runner: Runner, probe: Path) -> None:
    r = runner.sh("kill -9 1; kill -TERM 1; kill -9 -1; sleep 0.2; echo alive")
    assert r["status"] == "ok" and "alive" in r["stdout"]
    r = runner.exec(str(probe), "sys", str(nr("ptrace")), "16", "1")  # PTRACE_ATTACH 1
    assert r["exit_code"] == EPERM


# ------------------------------------------------------------------ filesystem


def test_root_is_read_only_on_request_work_and_tmp_are_writable(runner: Runner,
                                                                 probe: Path) -> None:
    for path, expect in (("/etc/x", 30), ("/usr/x", 30), ("/x", 30), ("/work/x", 0),
                         ("/tmp/x", 0), ("/dev/shm/x", 0), ("/dev/x", 30), ("/proc/x", 2)):
        r = runner.exec("--read-only", str(probe), "write", path)
        assert r["exit_code"] in ((expect,) if expect != 2 else (2, 13)), (path, r)


def test_the_root_is_a_throw_away_layer_of_the_jobs_own(runner: Runner, probe: Path) -> None:
    """Without --read-only the root is writable as the image's permissions allow (as in a
    Docker container): root-owned directories refuse the job's uid (EACCES, not EROFS, so
    `rm -f` of a missing file succeeds), and nothing a job changes reaches the next job."""
    for path, expect in (("/etc/x", 13), ("/usr/x", 13), ("/x", 13), ("/work/x", 0),
                         ("/tmp/x", 0), ("/dev/x", 30)):
        r = runner.exec(str(probe), "write", path)
        assert r["exit_code"] == expect, (path, r)
    r = runner.sh("rm -f /etc/no-such-file && echo removed; mkdir /tmp/d && echo made")
    assert r["stdout"] == "removed\nmade\n", r
    r = runner.sh("ls /tmp")
    assert r["stdout"] == "", r


def test_every_mount_is_nosuid_and_nodev(runner: Runner) -> None:
    r = runner.exec("cat", "/proc/self/mountinfo")
    for line in r["stdout"].splitlines():
        fields = line.split()
        opts = fields[5].split(",")
        target = fields[4]
        assert "nosuid" in opts, line
        if not target.startswith("/dev/") or target in ("/dev/pts", "/dev/shm"):
            assert "nodev" in opts or target == "/dev/pts", line


def test_minimal_dev(runner: Runner) -> None:
    r = runner.exec("ls", "/dev")
    assert set(r["stdout"].split()) == {"null", "zero", "full", "random", "urandom", "tty",
                                        "ptmx", "pts", "shm", "fd", "stdin", "stdout", "stderr"}


def test_old_root_is_gone(runner: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "host-secret"
    marker.write_text("secret")
    r = runner.sh(f"cat {marker}; cat /proc/1/root{marker}; ls /oldroot /.oldroot; "
                  "cat /etc/hostname; find / -xdev -name host-secret 2>/dev/null")
    assert "secret" not in r["stdout"]


def test_nothing_survives_into_the_next_job(runner: Runner) -> None:
    first = runner.sh("echo x > /work/left; echo y > /tmp/left; echo z > /dev/shm/left")
    assert first["status"] == "ok"
    r = runner.sh("ls -A /work /tmp /dev/shm")
    assert "left" not in r["stdout"]


@pytest.mark.cgroups
def test_fresh_proc_and_hostname(runner: Runner) -> None:
    r = runner.sh("hostname; cat /proc/sys/kernel/hostname; cat /proc/self/cgroup")
    lines = r["stdout"].splitlines()
    assert lines[0] == lines[1] == "sandbox"
    assert all(line.endswith(":/") for line in lines[2:]), lines  # cgroup namespace


def test_proc_sys_and_sysrq_are_not_writable(runner: Runner) -> None:
    r = runner.sh("echo x > /proc/sys/kernel/hostname; echo a=$?; "
                  "echo '|/tmp/x' > /proc/sys/kernel/core_pattern; echo b=$?; "
                  "echo b > /proc/sysrq-trigger; echo c=$?; ls /sys 2>&1; "
                  "wc -c < /proc/kcore; wc -c < /proc/keys")
    out = r["stdout"].split()
    assert "a=0" not in out and "b=0" not in out and "c=0" not in out, r
    assert "Permission denied" in r["stderr"]  # /proc/kcore and /proc/keys are masked


# ------------------------------------------------------------------ descriptors


def test_inherited_descriptors_are_closed(runner: Runner, probe: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host data")
    fds = [os.open(secret, os.O_RDONLY), *os.pipe()]
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        r = runner.exec(str(probe), "fds", pass_fds=tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(int(x) for x in r["stdout"].split()) == [0, 1, 2], r


# ------------------------------------------------------------------ network and IPC


@pytest.fixture
def host_listener() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    hits: list[bytes] = []

    def serve() -> None:
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
            hits.append(conn.recv(10))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    srv.close()
    t.join()
    assert not hits, "the job reached a host listener"


def test_network_is_loopback_only(runner: Runner, host_listener: int) -> None:
    r = runner.sh(f"ip addr 2>/dev/null || ifconfig -a; "
                  f"echo hi | nc -w 1 127.0.0.1 {host_listener}; echo nc=$?; "
                  "cat /proc/net/dev")
    assert "nc=1" in r["stdout"]
    devices = [line.split(":")[0].strip() for line in r["stdout"].splitlines()
               if ":" in line and line.split(":")[0].strip().isalnum()]
    assert "lo" in r["stdout"] and "eth0" not in devices


def test_loopback_is_up_inside(runner: Runner) -> None:
    r = runner.sh("nc -l -p 7000 > /tmp/got & sleep 0.2; echo ping | nc -w 1 127.0.0.1 7000; "
                  "sleep 0.2; cat /tmp/got")
    assert r["stdout"].strip().endswith("ping"), r


def test_ipc_namespace(runner: Runner) -> None:
    key = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    shmid = key.stdout.split()[-1]
    try:
        r = runner.exec("ipcs", "-m")
        assert shmid not in r["stdout"].split()
    finally:
        subprocess.run(["ipcrm", "-m", shmid], check=True)


def test_host_unix_socket_is_unreachable(runner: Runner, tmp_path: Path) -> None:
    path = tmp_path / "sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    tmp_path.chmod(0o755)
    path.chmod(0o777)
    try:
        r = runner.sh(f"echo hi | nc local:{path} 2>&1; echo rc=$?; ls {path} 2>&1")
        assert "No such file" in r["stdout"] or "rc=1" in r["stdout"]
    finally:
        srv.close()


# ------------------------------------------------------------------ seccomp

DENIED = ["ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
          "fsopen", "fsmount", "move_mount", "open_tree", "mount_setattr", "unshare", "setns",
          "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
          "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
          "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
          "swapon", "swapoff", "acct", "syslog", "open_by_handle_at", "settimeofday",
          "clock_settime", "clock_adjtime", "adjtimex"]


def test_seccomp_denies_the_dangerous_calls(runner: Runner, probe: Path) -> None:
    script = "; ".join(f"./probe sys {nr(name)} >/dev/null; echo {name}=$?" for name in DENIED)
    r = runner.exec("--file", str(probe), "sh", "-c", script)
    results = dict(line.split("=") for line in r["stdout"].splitlines())
    wrong = {k: v for k, v in results.items() if int(v) != EPERM}
    assert not wrong and len(results) == len(DENIED), wrong


def test_clone_with_namespace_flags_fails(runner: Runner, probe: Path) -> None:
    for flag in (0x10000000, 0x20000000, 0x40000000, 0x00020000, 0x08000000, 0x04000000,
                 0x02000000, 0x80):  # USER PID NET NS IPC UTS CGROUP TIME
        r = runner.exec(str(probe), "sys", str(nr("clone")), hex(flag | 17))
        assert r["exit_code"] == EPERM, (hex(flag), r)
    r = runner.exec(str(probe), "sys", str(nr("clone3")), "0", "0")
    assert r["exit_code"] == ENOSYS


def test_personality_changes_fail_but_query_works(runner: Runner, probe: Path) -> None:
    personality = str(nr("personality"))
    assert runner.exec(str(probe), "sys", personality, "0x0400000")["exit_code"] == EPERM
    assert runner.exec(str(probe), "sys", personality, "0x0040000")["exit_code"] == EPERM
    assert runner.exec(str(probe), "sys", personality, "0xffffffff")["exit_code"] == 0


@pytest.mark.parametrize("abi", ["x32", "int80"])
def test_other_abis_are_killed(runner: Runner, probe: Path, abi: str) -> None:
    r = runner.exec(str(probe), abi, "39" if abi == "x32" else "20")  # getpid
    assert (r["status"], r["signal"]) == ("signaled", SIGSYS), r
