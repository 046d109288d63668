"""Benchmarks against bwrap and a bare fork+exec, measured in the same run.

    .venv/bin/python -m bench.run            # the whole table (about two minutes)
    .venv/bin/python -m bench.run --quick    # fewer iterations

Prints a markdown table (value, the comparison it is measured against, the goal and whether
it is met) and writes bench/results/latest.json. Absolute times depend on the machine and
its load; ratios measured in the same run are the meaningful part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from sandbox.client import AsyncClient, Client
from sandbox.spec import JobSpec

HERE = Path(__file__).resolve().parent
SANDBOX = str(Path(sys.executable).parent / "sandbox")
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
         "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
         "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp"]


@dataclass
class Row:
    name: str
    value: str
    against: str
    goal: str
    met: bool | None


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def spawn_wait(argv: list[str]) -> float:
    t = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin"})
    os.waitpid(pid, 0)
    return time.perf_counter() - t


def latencies(fn: Callable[[], object], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(make_worker: Callable[[], Callable[[], object]], workers: int,
               seconds: float) -> float:
    """Jobs per second with ``workers`` threads, each running its own worker in a loop."""
    counts = [0] * workers
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        work = make_worker()
        while time.monotonic() < stop:
            work()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


class Daemon:
    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
        self.path = self.dir / "sandbox.sock"
        self.log = open(self.dir / "daemon.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([SANDBOX, "daemon", "--socket", str(self.path), *args],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while b"event=listening" not in (self.dir / "daemon.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((self.dir / "daemon.log").read_text())
            time.sleep(0.05)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def wait_warm(self, minimum: int) -> None:
        with Client(self.path, mode="daemon") as c:
            deadline = time.monotonic() + 30
            while c.list_jobs()["pool"]["idle"] < minimum and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def build_loop_program(tmp: Path) -> Path:
    src = tmp / "loop.c"
    src.write_text("""
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    if (argv[2][0] == 's') { for (long i = 0; i < n; i++) syscall(SYS_getppid); }
    else { volatile unsigned long x = 0; for (long i = 0; i < n; i++) x += i * i; }
    return 0;
}
""")
    out = tmp / "loop"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(src)], check=True)
    out.chmod(0o755)
    tmp.chmod(0o755)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 100 if args.quick else 400
    secs = 3.0 if args.quick else 8.0
    rows: list[Row] = []
    raw: dict[str, float] = {}

    # ---------------------------------------------------------------- baselines
    true_bin = shutil.which("true") or "/bin/true"
    bare = latencies(lambda: spawn_wait([true_bin]), n)
    raw["bare_median"] = statistics.median(bare)
    raw["bare_tput"] = throughput(lambda: lambda: spawn_wait([true_bin]), 2, secs)
    bw = latencies(lambda: spawn_wait([shutil.which("bwrap") or "bwrap", *BWRAP[1:],
                                       "/usr/bin/true"]), n)
    raw["bwrap_median"], raw["bwrap_p99"] = statistics.median(bw), percentile(bw, 0.99)
    raw["bwrap_tput"] = throughput(
        lambda: lambda: spawn_wait([shutil.which("bwrap") or "bwrap", *BWRAP[1:],
                                    "/usr/bin/true"]), 2, secs)

    daemon = Daemon("--pool", "8", "--warm", "busybox", "--warm", "py3")
    try:
        daemon.wait_warm(8)
        spec = JobSpec(image="busybox", argv=("/bin/true",))
        with Client(daemon.path, mode="daemon") as client:
            sb = latencies(lambda: client.run(spec), n)
        raw["sandbox_median"], raw["sandbox_p99"] = statistics.median(sb), percentile(sb, 0.99)

        def worker() -> Callable[[], object]:
            c = Client(daemon.path, mode="daemon")
            return lambda: c.run(spec)

        raw["sandbox_tput"] = throughput(worker, 2, secs)
        lat_ratio = raw["sandbox_median"] / raw["bwrap_median"]
        tput_ratio = raw["sandbox_tput"] / raw["bwrap_tput"]
        rows += [
            Row("trivial job, warm daemon, median", ms(raw["sandbox_median"]),
                f"bwrap {ms(raw['bwrap_median'])} ({lat_ratio:.2f}x), "
                f"bare fork+exec {ms(raw['bare_median'])}",
                "<= 2 ms and <= 0.45x bwrap",
                raw["sandbox_median"] <= 0.002 and lat_ratio <= 0.45),
            Row("trivial job, warm daemon, p99", ms(raw["sandbox_p99"]),
                f"bwrap p99 {ms(raw['bwrap_p99'])}", "<= 5 ms", raw["sandbox_p99"] <= 0.005),
            Row("throughput, 2 concurrent clients", f"{raw['sandbox_tput']:.0f} jobs/s",
                f"bwrap {raw['bwrap_tput']:.0f}/s ({tput_ratio:.2f}x), "
                f"bare {raw['bare_tput']:.0f}/s",
                ">= 1000/s and >= 3x bwrap", raw["sandbox_tput"] >= 1000 and tput_ratio >= 3),
        ]

        # ------------------------------------------------------------ python3 -c pass
        py = "/usr/bin/python3"
        bare_py = latencies(lambda: spawn_wait([py, "-c", "pass"]), n // 4)
        pyspec = JobSpec(image="py3", argv=("python3", "-c", "pass"))
        with Client(daemon.path, mode="daemon") as client:
            daemon.wait_warm(1)
            in_py = latencies(lambda: client.run(pyspec), n // 4)
        raw["py_bare"], raw["py_sandbox"] = statistics.median(bare_py), statistics.median(in_py)
        over = raw["py_sandbox"] - raw["py_bare"]
        rows.append(Row("`python3 -c pass` in py3", ms(raw["py_sandbox"]),
                        f"bare {ms(raw['py_bare'])} (+{ms(over)})", "<= 1.5 ms over bare",
                        over <= 0.0015))

        # ------------------------------------------------------------ CLI end to end
        tmp = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
        hello = tmp / "hello.py"
        hello.write_text("print('hello')\n")
        env = {**os.environ, "SANDBOX_SOCKET": str(daemon.path)}
        cli = latencies(lambda: subprocess.run([SANDBOX, "exec", "--image", "py3", str(hello)],
                                               env=env, check=True, capture_output=True),
                        n // 8, warmup=3)
        bare_hello = latencies(lambda: spawn_wait([py, str(hello)]), n // 8)
        raw["cli_e2e"], raw["hello_bare"] = statistics.median(cli), statistics.median(bare_hello)
        ratio = raw["cli_e2e"] / raw["hello_bare"]
        rows.append(Row("`sandbox exec --image py3 hello.py`, daemon up", ms(raw["cli_e2e"]),
                        f"`python3 hello.py` {ms(raw['hello_bare'])} ({ratio:.2f}x)",
                        "<= 3x bare", ratio <= 3))

        # ------------------------------------------------------------ CPU and syscalls
        loop = build_loop_program(tmp)
        work = "300000000" if not args.quick else "100000000"
        t = time.perf_counter()
        subprocess.run([str(loop), work, "c"], check=True)
        raw["cpu_bare"] = time.perf_counter() - t
        with Client(daemon.path, mode="daemon") as client:
            from sandbox.spec import File  # noqa: PLC0415

            data = loop.read_bytes()
            r = client.run(JobSpec(image="busybox", argv=("./loop", work, "c"),
                                   files=(File(name="loop", data=data, mode=0o755),)))
            raw["cpu_sandbox"] = r.wall_time
            calls = "3000000"
            t = time.perf_counter()
            subprocess.run([str(loop), calls, "s"], check=True)
            raw["sys_bare"] = time.perf_counter() - t
            r = client.run(JobSpec(image="busybox", argv=("./loop", calls, "s"),
                                   files=(File(name="loop", data=data, mode=0o755),)))
            raw["sys_sandbox"] = r.wall_time
        cpu_ratio = raw["cpu_sandbox"] / raw["cpu_bare"]
        rows.append(Row("CPU-bound loop inside", f"{raw['cpu_sandbox']:.3f} s",
                        f"bare {raw['cpu_bare']:.3f} s ({(cpu_ratio - 1) * 100:+.1f}%)",
                        "within 2% of bare", abs(cpu_ratio - 1) <= 0.02))
        per_call = (raw["sys_sandbox"] - raw["sys_bare"]) / int(calls) * 1e9
        rows.append(Row("syscall loop (getppid x3M) inside", f"{raw['sys_sandbox']:.3f} s",
                        f"bare {raw['sys_bare']:.3f} s: seccomp costs {per_call:.0f} ns/call "
                        f"({(raw['sys_sandbox'] / raw['sys_bare'] - 1) * 100:+.0f}%)",
                        "report", None))
        shutil.rmtree(tmp)
    finally:
        daemon.stop()

    # ---------------------------------------------------------------- 1000 sleepers
    big = Daemon("--pool", "0", "--max-running", "1100", "--max-queued", "2000")
    try:
        jobs = 200 if args.quick else 1000
        rss_before = big.rss()
        peak = [rss_before]

        async def sleepers() -> int:
            ok = 0
            async with AsyncClient(big.path) as client:
                async def one() -> None:
                    nonlocal ok
                    r = await client.run(JobSpec(image="busybox", argv=("sleep", "3")))
                    ok += r.status.value == "ok"

                async def watch() -> None:
                    while True:
                        peak[0] = max(peak[0], big.rss())
                        await trio.sleep(0.2)

                async with trio.open_nursery() as outer:
                    outer.start_soon(watch)
                    async with trio.open_nursery() as n_:
                        for _ in range(jobs):
                            n_.start_soon(one)
                    outer.cancel_scope.cancel()
            return ok

        t = time.perf_counter()
        ok = trio.run(sleepers)
        raw["sleepers_s"] = time.perf_counter() - t
        rows.append(Row(f"{jobs} concurrent `sleep 3` jobs, one daemon", f"{ok}/{jobs} results",
                        f"in {raw['sleepers_s']:.1f} s; daemon RSS {rss_before >> 20} MB idle, "
                        f"{peak[0] >> 20} MB peak", "every result returned, RSS reported",
                        ok == jobs))
    finally:
        big.stop()

    print(f"\nMachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Linux {platform.release()}, load {os.getloadavg()[0]:.2f}\n")
    print("| measure | sandbox | compared with (same run) | goal | met |")
    print("|---|---|---|---|---|")
    for row in rows:
        met = "report" if row.met is None else ("yes" if row.met else "no")
        print(f"| {row.name} | {row.value} | {row.against} | {row.goal} | {met} |")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
