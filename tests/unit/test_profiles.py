"""Profile parsing and seccomp compilation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.errors import ProfileError
from sandbox.profiles import load_profile, parse_profile
from sandbox.seccomp import compile_bpf, pfc

MINIMAL = """
[limits]
time = 1
wall_time = 2
memory = "64M"
pids = 8
output = "1M"
disk = "1M"
[seccomp]
deny = ["ptrace"]
"""


def test_shipped_profiles_parse_and_compile() -> None:
    for name in ("default", "build"):
        profile = load_profile(name)
        assert not profile.limits.missing()
        bpf = compile_bpf(profile.seccomp)
        assert len(bpf) % 8 == 0 and len(bpf) > 8


def test_default_profile_denies_what_the_issue_lists() -> None:
    policy = load_profile("default").seccomp
    for name in ("ptrace", "process_vm_readv", "mount", "umount2", "pivot_root", "fsopen",
                 "fsmount", "move_mount", "open_tree", "mount_setattr", "unshare", "setns",
                 "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                 "io_uring_setup", "kexec_load", "init_module", "reboot", "swapon", "acct",
                 "syslog", "open_by_handle_at", "settimeofday", "clock_settime"):
        assert name in policy.deny, name
    assert "clone3" in policy.enosys
    rules = {(r.syscall, r.arg) for r in policy.rules}
    assert {("clone", 0), ("ioctl", 1), ("personality", 0)} <= rules
    text = pfc(policy)
    assert "KILL_PROCESS" in text or "KILL" in text  # another ABI kills


def test_minimal_profile_and_defaults() -> None:
    p = parse_profile("t", Path("t.toml"), MINIMAL)
    assert (p.uid, p.gid, p.workdir) == (1000, 1000, "/work")
    assert p.limits.memory == 64 << 20


@pytest.mark.parametrize(("mutation", "message"), [
    (lambda t: t.replace("time = 1\n", ""), "must set time"),
    (lambda t: t + "[bogus]\n", "unknown section"),
    (lambda t: t.replace('memory = "64M"', 'memory = "lots"'), "memory"),
    (lambda t: t + '[job]\nworkdir = "relative"\n', "workdir"),
    (lambda t: t + "[job]\nuid = -1\n", "uid"),
    (lambda t: t + '[rlimits]\nnofiles = [1, 1]\n', "unknown limit"),
    (lambda t: t.replace('deny = ["ptrace"]', 'deny = ["ptrace"]\nerrno = "ENOPE"'), "errno"),
    (lambda t: t + '[[seccomp.rule]]\nsyscall = "ioctl"\narg = 9\nequals_32 = 1\n', "arg"),
    (lambda t: "this is not toml = = =", "t.toml"),
])
def test_invalid_profiles_name_the_problem(mutation, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProfileError, match=message):
        parse_profile("t", Path("t.toml"), mutation(MINIMAL))


def test_unknown_syscall_is_an_error() -> None:
    p = parse_profile("t", Path("t.toml"), MINIMAL.replace('["ptrace"]', '["no_such_call"]'))
    with pytest.raises(ProfileError, match="no_such_call"):
        compile_bpf(p.seccomp)


def test_unknown_profile() -> None:
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("no-such-profile")


def test_a_cached_profile_follows_its_file_and_the_search_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_profile is cached per job, yet a user's profile that appears later shadows the
    shipped one, and an edit takes effect at once."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    shipped = load_profile("default")
    assert load_profile("default") is shipped
    mine = tmp_path / "sandbox" / "profiles" / "default.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text(MINIMAL)
    assert load_profile("default").limits.time == 1
    mine.write_text(MINIMAL.replace("time = 1", "time = 9"))
    os.utime(mine, ns=(1, 1))  # a new mtime even within the clock's resolution
    assert load_profile("default").limits.time == 9
    mine.unlink()
    assert load_profile("default").digest == shipped.digest
