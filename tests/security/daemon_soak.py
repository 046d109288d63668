"""Soak and load through one running daemon, as the user who runs this module (the daemon
only talks to its own user): N sequential jobs, or rounds of M jobs that all run at once.
Prints a JSON report of what the daemon held after warm-up and at the end, at the same
steady state (nothing running, the warm pool full, used sandboxes torn down)::

    python -m tests.security.daemon_soak --socket S --pid P sequential 10000
    python -m tests.security.daemon_soak --socket S --pid P concurrent 1000 --rounds 2

Run by test_daemon_soak.py; by hand it takes larger numbers (the daemon needs
``--max-running M`` for M concurrent jobs).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from sandbox import cgroups
from sandbox.client import Client
from sandbox.images.store import Store
from sandbox.protocol import (
    PROTOCOL_VERSION,
    Connection,
    ErrorReply,
    Hello,
    JobFinished,
    JobStarted,
    RunJob,
    StdinData,
)
from sandbox.spec import JobSpec, Limits
from tests import cgroupfs
from tests.security.soak import JOBS, WALL_KILL_EVERY, _mounts, _temp_entries


class Watched:
    """The daemon's process, seen from outside."""

    def __init__(self, pid: int, socket: Path) -> None:
        self.pid = pid
        self.socket = socket
        self.user = cgroups.user_name()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> list[str]:
        """What the daemon's descriptors point at, socket and pipe inodes left out."""
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            out.append(target.split(":[")[0] if ":[" in target else target)
        return sorted(out)

    def cgroups(self) -> list[str]:
        return [p.name for p in cgroupfs.job_cgroups(self.user, self.pid)]

    def descendants(self) -> int:
        children: dict[int, list[int]] = collections.defaultdict(list)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
        count, todo = 0, [self.pid]
        while todo:
            kids = children.get(todo.pop(), [])
            count += len(kids)
            todo += kids
        return count

    def steady(self) -> dict[str, Any]:
        """Wait until nothing runs, the pool is full, used sandboxes are gone (one cgroup
        per idle sandbox) and connections that closed are let go (the descriptors stay the
        same over two looks); then take the daemon's measures (with our one connection)."""
        deadline = time.monotonic() + 60
        with Client(self.socket, mode="daemon") as client:
            last: list[str] = []
            while True:
                jobs = client.list_jobs()
                idle = jobs["pool"]["idle"]
                fds = self.fds()
                settled = (not jobs["running"] and not jobs["queued"]
                           and idle == jobs["pool"]["size"] * jobs["pool"]["shapes"]
                           and len(self.cgroups()) == idle and fds == last)
                if settled or time.monotonic() > deadline:
                    break
                last = fds
                time.sleep(0.1)
            return {"settled": settled, "idle": idle, "rss": self.rss(), "fds": fds,
                    "cgroups": len(self.cgroups()), "descendants": self.descendants()}


def sequential(watched: Watched, n: int, warmup: int) -> dict[str, Any]:
    statuses: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    report: dict[str, Any] = {}
    with Client(watched.socket, mode="daemon") as client:
        for i in range(n):
            script, expected = JOBS[i % len(JOBS)]
            limits = Limits()
            if i % WALL_KILL_EVERY == WALL_KILL_EVERY - 1:
                script, expected, limits = "sleep 5", "time_limit", Limits(wall_time=0.2)
            script = f"echo {i}; {script}"
            r = client.run(JobSpec(image="busybox", argv=("sh", "-c", script), limits=limits))
            statuses[r.status.value] += 1
            if r.status.value != expected or not r.stdout.startswith(f"{i}\n".encode()):
                wrong.append(f"{i}: {script!r} -> {r.status.value} {r.message} "
                             f"{r.stdout[:40]!r}")
            if i == warmup - 1:
                report["warm"] = watched.steady()
        report["end"] = watched.steady()  # with this connection open, as at warm-up
    report.update(statuses=dict(statuses), wrong=wrong[:10],
                  jobs=sum(statuses.values()))
    return report


async def _round(path: Path, m: int, connections: int) -> tuple[int, int, list[str]]:
    """``m`` jobs over ``connections`` connections; each job waits for its stdin, which is
    sent once all ``m`` have started: so all ``m`` run at the same time. Returns (started,
    finished, what was wrong)."""
    started: set[tuple[int, int]] = set()
    all_started = trio.Event()
    finished = 0
    wrong: list[str] = []

    async def connection(c: int, jobs: range) -> None:
        nonlocal finished
        conn = Connection("client")
        stream = await trio.open_unix_socket(str(path))
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(conn.send(Hello(PROTOCOL_VERSION, "soak")))
            for i in jobs:
                spec = JobSpec(image="busybox", argv=("sh", "-c", "read x; echo $x-$x"),
                               limits=Limits(wall_time=600))
                await stream.send_all(conn.send(RunJob(i, spec.to_dict(), stdin_stream=True)))

            async def release() -> None:
                await all_started.wait()
                for i in jobs:
                    await stream.send_all(conn.send(StdinData(i, f"{i}\n".encode(), eof=True)))

            nursery.start_soon(release)
            left = set(jobs)
            while left:
                data = await stream.receive_some(1 << 16)
                if not data:
                    wrong.append(f"connection {c} closed with {len(left)} jobs left")
                    all_started.set()
                    return
                conn.receive_data(data)
                while (event := conn.next_event()) is not None:
                    if isinstance(event, JobStarted):
                        started.add((c, event.id))
                        if len(started) == m:
                            all_started.set()
                    elif isinstance(event, JobFinished):
                        left.discard(event.id)
                        finished += 1
                        want = f"{event.id}-{event.id}\n".encode()
                        if (event.result["status"], event.result["stdout"]) != ("ok", want):
                            wrong.append(f"{c}/{event.id}: {event.result['status']} "
                                         f"{event.result['stdout'][:40]!r} "
                                         f"{event.result.get('message')}")
                    elif isinstance(event, ErrorReply):
                        left.discard(event.id or -1)
                        wrong.append(f"{c}/{event.id}: error {event.message}")
                        all_started.set()  # never all: do not wait for the rest

    per = m // connections
    async with trio.open_nursery() as nursery:
        for c in range(connections):
            nursery.start_soon(connection, c, range(c * per + 1, (c + 1) * per + 1))
    return len(started), finished, wrong


def concurrent(watched: Watched, m: int, rounds: int, connections: int) -> dict[str, Any]:
    report: dict[str, Any] = {"rounds": []}
    for _ in range(rounds):
        t = time.monotonic()
        started, finished, wrong = trio.run(_round, watched.socket, m, connections)
        report["rounds"].append({"started": started, "finished": finished,
                                 "wrong": wrong[:10], "seconds": time.monotonic() - t,
                                 **watched.steady()})
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("mode", choices=["sequential", "concurrent"])
    parser.add_argument("count", type=int)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=10)
    args = parser.parse_args()
    if args.count % args.connections:
        parser.error("the count must be a multiple of --connections")
    watched = Watched(args.pid, args.socket)
    if args.mode == "sequential":
        report = sequential(watched, args.count, min(args.warmup, args.count))
    else:
        report = concurrent(watched, args.count, args.rounds, args.connections)
    report["temp"] = _temp_entries(Store().root)
    report["mounts"] = _mounts()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
