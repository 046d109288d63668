"""The v2 backend's file handling where the kernel in CI cannot show it: memory.peak
missing (Linux before 5.19), so the peak is the largest memory.current sampled. These run
on plain files in a temporary directory; the backend on a real hierarchy is tested in
tests/integration/test_cgroups_v2.py."""

from __future__ import annotations

from pathlib import Path

from sandbox.cgroups import systemd, v2


def test_peak_is_sampled_where_memory_peak_is_missing(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    cg = v2.V2Cgroup("1-1", tmp_path)
    for current in (10 << 20, 50 << 20, 20 << 20):
        (tmp_path / "memory.current").write_text(f"{current}\n")
        cg.sample()
    stats = cg.stats()
    assert (stats.cpu_time, stats.memory_peak, stats.oom_killed) == (1.5, 50 << 20, True)


def test_memory_peak_is_read_where_the_kernel_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "memory.peak").write_text(f"{70 << 20}\n")
    (tmp_path / "memory.current").write_text(f"{90 << 20}\n")
    cg = v2.V2Cgroup("1-1", tmp_path)
    cg.sample()
    assert cg.stats().memory_peak == 70 << 20


def test_within() -> None:
    assert v2._within("a/b/c", "a/b") and v2._within("a/b", "a/b") and v2._within("x", "")
    assert not v2._within("a/bc", "a/b") and not v2._within("a", "a/b")


def test_managers_are_reached_by_uid_not_environment() -> None:
    assert systemd._endpoints(0)[0] == ("/run/systemd/private", False)
    assert systemd._endpoints(1000)[0] == ("/run/user/1000/systemd/private", False)
    assert ("/run/user/1000/bus", True) in systemd._endpoints(1000)
