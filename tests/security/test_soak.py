"""Soak: 1,000+ sequential jobs through one embedded supervisor in one Python process
(tests/security/soak.py), as root and as the unprivileged user: every result as expected,
and afterwards no leaked process, mount, cgroup, descriptor or temporary directory; RSS
growth reported and bounded. (10,000 jobs through a daemon: test_daemon_soak.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import REPO, Runner

JOBS = 1200
RSS_GROWTH_BOUND = 16 << 20  # bytes, after a warm-up of 20 jobs


@pytest.mark.slow
def test_soak_sequential_jobs(runner: Runner, no_leaks: None,
                              record_property: Callable[[str, object], None]) -> None:
    argv = [sys.executable, "-m", "tests.security.soak", str(JOBS)]
    if runner.user is not None:
        env = [f"{k}={v}" for k, v in runner.env.items()]
        argv = ["runuser", "-u", runner.user, "--", "env", "-i", *env, f"PYTHONPATH={REPO}",
                *argv]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    report = json.loads(proc.stdout)
    growth = report["rss_end"] - report["rss_warm"]
    record_property("rss_growth_bytes", growth)
    print(f"soak as {runner.name}: {JOBS} jobs, statuses {report['statuses']}, "
          f"RSS {report['rss_warm'] >> 20} -> {report['rss_end'] >> 20} MiB")
    assert sum(report["statuses"].values()) == JOBS and not report["wrong"], report["wrong"]
    assert report["fds_end"] == report["fds_warm"], "descriptors leaked"
    for key in ("children", "cgroups", "temp", "mounts", "children_after_close"):
        assert report[key] == [], (key, report[key])
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth} bytes over {JOBS} jobs"
