"""Soak and load through one daemon, as root and as the unprivileged user: 10,000
sequential jobs, and rounds of 1,000 jobs running at once (a fifth of each for the user,
whose sandboxes each take two newuidmap runs: the whole file runs in about 5 minutes).
Every result returned and correct; at the same steady state after warm-up and at the end,
the daemon holds the same descriptors, cgroups and processes, and its RSS grew by less
than 10%; after it stops, nothing is left (no process, mount, cgroup or temporary
directory). The driver is tests/security/daemon_soak.py (runnable by hand with larger
numbers).

SANDBOX_SOAK_JOBS and SANDBOX_SOAK_CONCURRENT change the numbers (e.g. for a quick run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Runner
from tests.security.test_daemon_faults import daemon_pid, own_daemon

JOBS = int(os.environ.get("SANDBOX_SOAK_JOBS", "10000"))
CONCURRENT = int(os.environ.get("SANDBOX_SOAK_CONCURRENT", "1000"))
RSS_GROWTH = 0.10

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaks")]


def drive(runner: Runner, socket: Path, pid: int, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "tests.security.daemon_soak", "--socket", str(socket),
            "--pid", str(pid), *args]
    if runner.user is not None:
        env = [f"{k}={v}" for k, v in runner.env.items()]
        argv = ["runuser", "-u", runner.user, "--", "env", "-i", *env, f"PYTHONPATH={REPO}",
                *argv]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=3000, check=False,
                          env=None if runner.user else {**os.environ, **runner.env})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def same_state(warm: dict[str, Any], end: dict[str, Any], what: str) -> None:
    assert warm["settled"] and end["settled"], (warm, end)
    for key in ("fds", "cgroups", "descendants", "idle"):
        assert end[key] == warm[key], f"{what}: {key} {warm[key]} -> {end[key]}"
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    assert growth < RSS_GROWTH, f"{what}: RSS {warm['rss']} -> {end['rss']} (+{growth:.1%})"


def test_sequential_jobs_through_one_daemon(runner: Runner,
                                            record_property: Callable[[str, object], None]) -> None:
    jobs = JOBS if runner.user is None else JOBS // 5  # (newuidmap per sandbox: slower)
    d = own_daemon(runner, "--pool", "2", "--warm", "busybox")
    try:
        report = drive(runner, d.path, daemon_pid(d), "sequential", str(jobs))
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
        subprocess.run(["rm", "-rf", str(d.path.parent)], check=True)
    warm, end = report["warm"], report["end"]
    record_property("rss_warm", warm["rss"])
    record_property("rss_end", end["rss"])
    print(f"daemon soak as {runner.name}: {report['jobs']} jobs {report['statuses']}, RSS "
          f"{warm['rss'] >> 10} -> {end['rss'] >> 10} KiB, {len(end['fds'])} fds")
    assert report["jobs"] == jobs and not report["wrong"], report["wrong"]
    same_state(warm, end, "sequential")
    assert report["temp"] == [] and report["mounts"] == [], report


def test_concurrent_jobs_through_one_daemon(runner: Runner,
                                            record_property: Callable[[str, object], None]) -> None:
    """All CONCURRENT jobs run at once (each waits for its stdin, sent once all have
    started), twice: the first round warms up, the second must not grow the daemon."""
    n = CONCURRENT if runner.user is None else CONCURRENT // 5
    d = own_daemon(runner, "--pool", "2", "--warm", "busybox", "--max-running", str(n))
    try:
        report = drive(runner, d.path, daemon_pid(d), "concurrent", str(n), "--rounds", "2")
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
        subprocess.run(["rm", "-rf", str(d.path.parent)], check=True)
    first, second = report["rounds"]
    record_property("rss_first", first["rss"])
    record_property("rss_second", second["rss"])
    print(f"daemon load as {runner.name}: {n} at once, rounds of {first['seconds']:.1f} s and "
          f"{second['seconds']:.1f} s, RSS {first['rss'] >> 10} -> {second['rss'] >> 10} KiB")
    for r in (first, second):
        assert (r["started"], r["finished"], r["wrong"]) == (n, n, []), r["wrong"]
    same_state(first, second, "concurrent")
    assert report["temp"] == [] and report["mounts"] == [], report
