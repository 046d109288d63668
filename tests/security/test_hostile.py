"""Hostile programs, each with the property that must hold, run through `sandbox exec` as
root and as an unprivileged user (and through every other route in `VIAS`).

After each test the `hostile` fixture checks the host: the canary process alive, host files,
binaries and image layers unchanged, nothing of the job left running, no cgroup, mount or
child leaked. The programs are in hostile.c; the isolation basics they build on are in
tests/integration/test_isolation.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sandbox.config import PACKAGE_DIR
from tests.security.conftest import Hostile, Victim, fields, processes_with

EPERM, ENOENT, EACCES, EROFS, ENOSPC, ENOSYS = 1, 2, 13, 30, 28, 38
SIGSYS = 31


def not_ok(values: dict[str, str], *, allow: tuple[str, ...] = ()) -> dict[str, str]:
    """The entries that succeeded (and should not have)."""
    return {k: v for k, v in values.items() if v == "ok" and k not in allow}


# ------------------------------------------------------------------ resource bombs


@pytest.mark.cgroups
def test_fork_bomb_is_contained(hostile: Hostile) -> None:
    r = hostile.run("forkbomb", opts=("--pids", "32", "--wall-time", "2"))
    assert r["status"] == "time_limit", r
    assert 0 < int(fields(r)["forks"]) <= 32, r["stdout"]


def test_shell_fork_bomb_that_exits_leaves_nothing(hostile: Hostile) -> None:
    # the main process returns at once; the bomb rages on in the background
    r = hostile.sh("b(){ b|b& };b", "--pids", "64", "--wall-time", "3")
    assert r["status"] in ("ok", "time_limit"), r


@pytest.mark.cgroups
def test_memory_bomb_over_many_processes(hostile: Hostile) -> None:
    r = hostile.run("membomb", "16", "16", opts=("--memory", "64M", "--wall-time", "20"))
    assert r["status"] == "memory_limit", r
    assert r["memory"] <= 64 << 20


@pytest.mark.cgroups
def test_cpu_burners_over_many_processes(hostile: Hostile) -> None:
    r = hostile.run("cpuburn", "8", opts=("--time", "1", "--wall-time", "30"))
    assert r["status"] == "time_limit", r
    assert r["cpu_time"] < 1.5, r  # the limit covers all eight processes


def test_disk_fill_of_every_writable_place(hostile: Hostile) -> None:
    places = ["/work", "/tmp", "/dev/shm", "/", "/etc", "/bin", "/var", "/dev", "/proc",
              "/dev/pts", "/run", "/home", "/root", "/mnt"]
    r = hostile.run("diskfill", *places, opts=("--disk", "8M"))
    f = fields(r)
    assert int(f["total"]) <= 8 << 20, f
    assert f["/work"].endswith(f":{ENOSPC}"), f
    writable = {"/work", "/tmp", "/dev/shm"}
    for place in places:
        if place not in writable:
            assert f[place].startswith("open:"), (place, f[place])


def test_stdout_and_stderr_floods_are_capped(hostile: Hostile) -> None:
    r = hostile.run("flood", opts=("--output", "1M"))
    assert r["status"] == "output_limit", {k: r[k] for k in ("status", "message")}
    assert len(r["stdout"]) + len(r["stderr"]) <= 1 << 20
    # without --json the output passes through: still capped
    proc = hostile.runner.run(["exec", "--image", "busybox", "--output", "1M",
                               "--env", f"SBX_HOSTILE={hostile.token}", str(hostile.bin),
                               "flood"])
    assert proc.returncode == 137
    summary = proc.stderr.rsplit(b"sandbox: ", 1)[-1]
    assert len(proc.stdout) + len(proc.stderr) - len(summary) <= (1 << 20) + 16


def test_sleeping_forever_and_ignoring_signals(hostile: Hostile) -> None:
    r = hostile.run("immortal", opts=("--wall-time", "1"))
    assert r["status"] == "time_limit" and r["signal"] == 9, r
    assert fields(r)["immortal"] == "ready"


def test_rlimits_cannot_be_raised(hostile: Hostile) -> None:
    f = fields(hostile.run("rlimits"))
    assert not not_ok(f), f
    for name in ("core", "nofile", "stack", "msgqueue"):  # set by the profile
        assert f[name] == str(EPERM), (name, f)


# ------------------------------------------------------------------ host data


def test_host_files_unreadable_directly_or_through_proc(hostile: Hostile,
                                                        victim: Victim) -> None:
    r = hostile.run("readhost", str(victim.secret_file), victim.secret[::-1],
                    extra_env={"CALLER_SECRET": victim.secret})
    assert "FOUND" not in r["stdout"], r["stdout"]
    assert fields(r)["found"] == "0"


def test_callers_environment_is_not_visible(hostile: Hostile, victim: Victim) -> None:
    r = hostile.sh("env; cat /proc/*/environ /proc/*/cmdline; echo done",
                   extra_env={"CALLER_SECRET": victim.secret})
    assert r["stdout"].rstrip().endswith("done")
    assert victim.secret not in r["stdout"] + r["stderr"]


def test_proc_shows_no_host_path_names(hostile: Hostile) -> None:
    """What the job can read of its mounts and of its init names nothing of the host: not
    the caller's home or user name, the image store, the runtime directory, our checkout."""
    r = hostile.sh("cat /proc/self/mountinfo /proc/self/mounts; tr '\\0' ' ' < /proc/1/cmdline;"
                   " echo; cat /proc/1/comm; echo done")
    out = r["stdout"]
    assert out.rstrip().endswith("done"), r
    assert "lowerdir=/proc/self/fd/" in out, out  # the overlay is there, named by descriptor
    assert out.splitlines()[-3:-1] == ["sandbox-init ", "sandbox-init"], out
    home, store = str(hostile.runner.home), str(hostile.runner.store())
    for leak in (home + "/", store, str(PACKAGE_DIR.parent) + "/", hostile.runner.name + "/",
                 "python"):
        assert leak not in out, (leak, out)
    assert not re.search(r"/run/user/|/sandbox-\d+/|/mnt/", out), out


def test_hardware_directories_of_proc_are_masked(hostile: Hostile) -> None:
    """/proc/acpi (and scsi, asound where the kernel has them) is an empty read-only tmpfs,
    as in Docker."""
    if not Path("/proc/acpi").is_dir():
        pytest.skip("this kernel has no /proc/acpi to mask")
    r = hostile.sh("ls -A /proc/acpi | wc -l; grep ' /proc/acpi ' /proc/self/mountinfo;"
                   " touch /proc/acpi/x 2>&1; echo done")
    lines = r["stdout"].splitlines()
    assert lines[0].strip() == "0", r
    assert " - tmpfs " in lines[1] and " ro," in lines[1], r
    assert "Read-only file system" in lines[2] and lines[-1] == "done", r


def test_host_processes_are_invisible(hostile: Hostile, victim: Victim) -> None:
    f = fields(hostile.run("procscan", victim.canary_name[::-1]))
    assert "FOUND" not in f and int(f["pids"]) < 10, f


def test_host_sockets_are_unreachable(hostile: Hostile, victim: Victim,
                                      shared_tmp: Path) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0{hostile.token}")
    abstract.listen()
    path = shared_tmp / "sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    path.chmod(0o777)
    listeners = [tcp, udp, abstract, unix]
    try:
        f = fields(hostile.run("net", str(port), hostile.token, str(path)))
        for sock in listeners:
            sock.setblocking(False)
        for sock in (tcp, abstract, unix):
            with pytest.raises(BlockingIOError):
                sock.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    finally:
        for sock in listeners:
            sock.close()
    assert not not_ok(f, allow=("udp4",)), f  # a datagram into the job's own loopback
    for name in ("raw4", "raw6", "rawtcp", "packet", "packet_dgram", "ifdown"):
        assert f[name] in (str(EPERM), "97"), (name, f)  # EPERM (or EAFNOSUPPORT)


def test_ptrace_and_proc_mem_of_anything(hostile: Hostile) -> None:
    f = fields(hostile.run("procmem"))
    assert not not_ok(f), f
    for name in ("ptrace_attach1", "ptrace_seize1", "ptrace_traceme", "ptrace_child",
                 "vm_readv1", "pidfd_getfd"):
        assert f[name] == str(EPERM), (name, f)


def test_runc_proc_self_exe_overwrite(hostile: Hostile) -> None:
    # CVE-2019-5736: write through the exe link of a process the runtime runs. Here init
    # (pid 1) is the host's Python: the fixture checks that binary and the image layers.
    script = ("for p in /proc/[0-9]*; do (echo x > $p/exe) 2>/dev/null && echo WROTE $p; done;"
              "(echo x > /proc/self/exe) 2>/dev/null && echo WROTE self;"
              "(echo x >> /bin/busybox) 2>/dev/null && echo WROTE busybox; echo done")
    r = hostile.sh(script)
    assert r["stdout"] == "done\n", r


def test_kill_everything_in_sight(hostile: Hostile, victim: Victim) -> None:
    r = hostile.run("signals", str(victim.canary_pid))
    assert r["status"] == "ok", r
    assert fields(r)["survived"] == "1"


def test_kernel_knobs_are_not_writable(hostile: Hostile) -> None:
    r = hostile.run("kernelknobs")
    f = fields(r)
    assert f["writable"] == "0", r["stdout"]
    assert not not_ok(f), f


def test_kernel_logs_and_memory_are_unreadable(hostile: Hostile) -> None:
    f = fields(hostile.run("kernellogs"))
    assert not not_ok(f), f
    assert f["syslog_read"] == f["syslog_clear"] == str(EPERM)
    r = hostile.exec("dmesg")
    assert r["status"] != "ok" and r["stdout"] == "", r


def test_mount_family_is_denied(hostile: Hostile) -> None:
    f = fields(hostile.run("mounts"))
    assert len(f) == 18 and set(f.values()) == {str(EPERM)}, f


def test_namespaces_cannot_be_created_or_joined(hostile: Hostile) -> None:
    f = fields(hostile.run("namespaces"))
    assert not not_ok(f), f
    assert f.pop("clone3") == str(ENOSYS)
    assert all(v == str(EPERM) for k, v in f.items() if not k.startswith("setns")), f


def test_kernel_apis_are_denied(hostile: Hostile) -> None:
    f = fields(hostile.run("kernelapis"))
    assert len(f) >= 25 and not not_ok(f), f


def test_device_nodes_and_file_capabilities(hostile: Hostile) -> None:
    f = fields(hostile.run("nodes"))
    assert not not_ok(f), f


def test_descriptors_scan_finds_only_stdio(hostile: Hostile) -> None:
    f = fields(hostile.run("fdscan"))
    assert f["open"] == "0", f


# ------------------------------------------------------------------ terminals


def test_tiocsti_into_a_terminal_given_as_stdin(hostile: Hostile) -> None:
    """The CLI's stdin, stdout and stderr are a real terminal; nothing the job does may
    push input into it."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        proc = subprocess.run(
            hostile.command(["exec", "--image", "busybox", "--env",
                             f"SBX_HOSTILE={hostile.token}", str(hostile.bin), "tiocsti"]),
            stdin=slave, stdout=slave, stderr=slave, env=hostile.popen_env(), timeout=60,
            check=False)
        os.set_blocking(master, False)
        os.set_blocking(slave, False)
        shown = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(master, 65536):
                shown += chunk
        with pytest.raises(BlockingIOError):  # nothing waits to be read from the terminal
            os.read(slave, 1024)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, shown
    values = dict(line.split("=", 1) for line in shown.decode().split() if "=" in line)
    assert values and not not_ok(values), values
    assert b"pwned" not in shown


# ------------------------------------------------------------------ descriptors


def _fd_targets(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _sleeping_jobs(token: str) -> list[int]:
    out = []
    for p in processes_with(token):
        pid = p.split(":")[0]
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x002\x00":
                out.append(int(pid))
    return out


def test_leaked_descriptors_reach_neither_job_nor_init(hostile: Hostile, victim: Victim) -> None:
    """The test leaks a file, a directory, an O_PATH of /, a socket and a pipe into the CLI;
    while the job runs, the host looks at the descriptors of the job and of its init."""
    leaked = [os.open(victim.secret_file, os.O_RDONLY), os.open(victim.dir, os.O_RDONLY),
              os.open("/", os.O_PATH), *os.pipe()]
    sock = socket.socket()
    leaked.append(sock.fileno())
    for fd in leaked:
        os.set_inheritable(fd, True)
    names = {os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}
    proc = subprocess.Popen(
        hostile.command(["exec", "--image", "busybox", "--env", f"SBX_HOSTILE={hostile.token}",
                         "sh", "-c", "echo up; sleep 2"]),
        pass_fds=tuple(leaked), env=hostile.popen_env(), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 10
        while not (jobs := _sleeping_jobs(hostile.token)) and time.monotonic() < deadline:
            time.sleep(0.02)  # "up" is printed just before sleep starts
        assert jobs, "the job was not found on the host"
        seen = set()
        for pid in jobs:
            seen |= _fd_targets(pid) | _fd_targets(_ppid(pid))
    finally:
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
        for fd in leaked:
            if fd != sock.fileno():
                os.close(fd)
        sock.close()
    assert not seen & names, seen & names


# ------------------------------------------------------------------ files and privileges


def test_setuid_program_copied_in_does_not_elevate(hostile: Hostile, shared_tmp: Path) -> None:
    prog = shared_tmp / "suid"
    prog.write_bytes(hostile.bin.read_bytes())
    os.chmod(prog, 0o4755)
    r = hostile.exec("--file", str(prog), "sh", "-c", "stat -c %a suid; id -u")
    assert r["stdout"].split() == ["755", "1000"], r


def test_double_forked_daemon_is_gone_after_the_job(hostile: Hostile) -> None:
    r = hostile.run("daemon")
    assert r["status"] == "ok" and fields(r)["daemon"] == "spawned", r
    # the fixture then asserts that no process carrying the job's token is left


def test_sysv_ipc_dies_with_the_job(hostile: Hostile) -> None:
    def host_keys() -> set[str]:
        keys = set()
        for kind in ("shm", "sem", "msg"):
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
            keys |= {f"{kind}:{line.split()[0]}" for line in lines}
        return keys

    before = host_keys()
    f = fields(hostile.run("sysv"))
    assert f["shmget_key"] == "ok" and f["shm_existing"] == str(ENOENT), f
    assert host_keys() - before == set()
    assert fields(hostile.run("sysv"))["shmget_key"] == "ok"  # fresh namespace again


def test_nothing_is_left_for_the_next_job(hostile: Hostile) -> None:
    mark = hostile.token
    first = hostile.sh(f"for d in /work /tmp /dev/shm /var/tmp /run /home /root / /etc; do "
                       f"echo {mark} > $d/left 2>/dev/null; done; mkfifo /tmp/fifo; "
                       f"ipcmk -M 4096 >/dev/null; (sleep 1000 &) ; echo done")
    assert first["stdout"].endswith("done\n"), first
    r = hostile.sh("cat /work/left /tmp/left /dev/shm/left /var/tmp/left /run/left "
                   "/home/left /root/left /left /etc/left 2>/dev/null; ls -A /tmp /work; "
                   "ipcs -m; ps")
    assert mark not in r["stdout"], r["stdout"]
    assert "fifo" not in r["stdout"] and "sleep" not in r["stdout"], r["stdout"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 and x32 are x86_64 ABIs")
@pytest.mark.parametrize("abi", ["int80", "x32"])
def test_other_abis_cannot_make_a_system_call(hostile: Hostile, abi: str) -> None:
    r = hostile.exec("--file", str(hostile.bin), "sh", "-c",
                     f"./hostile {abi}-mkdir /work/pwned; echo status=$?; ls /work")
    assert f"status={128 + SIGSYS}" in r["stdout"], r
    assert "pwned" not in r["stdout"]


# ------------------------------------------------------------------ argv and environment


def test_huge_argv_and_env_fail_cleanly_or_run(hostile: Hostile) -> None:
    """Up to the kernel's limit a command line runs (beyond it, refused: what the CLI
    itself could not even be started with is tested through the API, test_cli.py)."""
    many = ["a" * 1000] * 1000  # 1 MB of arguments
    r = hostile.exec("sh", "-c", 'echo "$#"', "sh", *many)
    assert (r["status"], r["stdout"]) == ("ok", "1000\n"), r
    big = hostile.exec("--env", "BIG=" + "b" * 100_000, "sh", "-c", 'echo "${#BIG} $#"', "sh",
                       *["a" * 100] * 500)
    assert big["stdout"].split() == ["100000", "500"], big


# ------------------------------------------------------------------ copying in


def test_symlinked_program_and_files_are_copied_as_regular_files(
        hostile: Hostile, shared_tmp: Path, victim: Victim) -> None:
    real = shared_tmp / "real.sh"
    real.write_text("#!/bin/sh\necho ran\n")
    real.chmod(0o755)
    (shared_tmp / "linked.sh").symlink_to(real)
    (shared_tmp / "data").symlink_to(victim.dir / "sub" / "file")
    (shared_tmp / "dirlink").symlink_to(victim.dir)
    r = hostile.exec("--file", str(shared_tmp / "data"), str(shared_tmp / "linked.sh"))
    assert r["stdout"] == "ran\n", r
    r = hostile.exec("--file", str(shared_tmp / "data"), "sh", "-c",
                     "ls -l /work; readlink /work/data /work/linked.sh; echo end")
    assert " -> " not in r["stdout"] and r["stdout"].endswith("end\n"), r
    # a symlink to a directory is not a file: refused, nothing copied
    proc = hostile.runner.run(["exec", "--image", "busybox", "--file",
                               str(shared_tmp / "dirlink"), "true"])
    assert proc.returncode == 125 and len(proc.stderr.splitlines()) == 1, proc
