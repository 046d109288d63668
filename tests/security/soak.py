"""Soak: N sequential jobs through one embedded supervisor in this one Python process,
then a JSON report of what might have leaked. Run by test_soak.py as root and as the
unprivileged user (``python -m tests.security.soak N``)."""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

from sandbox import cgroups, config
from sandbox.spec import JobSpec, Limits
from sandbox.supervisor.core import Supervisor
from tests import cgroupfs
from tests.conftest import _children

# (shell script, expected status): ok, a failure, output on both streams, a background
# process left behind, a signal, a wall-time kill, a file written
JOBS = [("true", "ok"), ("exit 3", "nonzero_exit"), ("echo out; echo err >&2", "ok"),
        ("sleep 1000 & echo bg", "ok"), ("kill -9 $$", "signaled"),
        ("head -c 100000 /dev/zero > /work/f; cat /work/f | wc -c", "ok")]
WALL_KILL_EVERY = 100  # every 100th job also sleeps past a 0.2 s wall-time limit


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _temp_entries(store: Path) -> list[str]:
    out = []
    for d in (store / "tmp", config.runtime_dir() / "mnt"):
        if d.is_dir():
            out += [str(d / n) for n in os.listdir(d)]
    return out


def _mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - overlay " in line]


async def soak(n: int) -> dict[str, Any]:
    statuses: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    report: dict[str, Any] = {}
    async with Supervisor() as sup:
        spawner = sup.spawner._proc.pid if sup.spawner._proc else -1
        for i in range(n):
            script, expected = JOBS[i % len(JOBS)]
            limits = Limits()
            if i % WALL_KILL_EVERY == WALL_KILL_EVERY - 1:
                script, expected, limits = "sleep 5", "time_limit", Limits(wall_time=0.2)
            result = await sup.run(JobSpec(image="busybox", argv=("sh", "-c", script),
                                           limits=limits))
            statuses[result.status.value] += 1
            if result.status.value != expected:
                wrong.append(f"{i}: {script!r} -> {result.status.value} {result.message}")
            if i == 19:  # warmed up: imports, caches, the spawner
                report.update(fds_warm=_fds(), rss_warm=_rss())
        report.update(
            fds_end=_fds(), rss_end=_rss(), statuses=dict(statuses), wrong=wrong[:10],
            children=[c for c in _children() if c.split()[0] != str(spawner)],
            cgroups=[p.name for p in cgroupfs.job_cgroups(cgroups.user_name(), os.getpid())],
            temp=_temp_entries(sup.store.root), mounts=_mounts())
    return report


def main() -> None:
    n = int(sys.argv[1])
    report = trio.run(soak, n)
    report["children_after_close"] = _children()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
