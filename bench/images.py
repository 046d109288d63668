"""Image benchmarks against podman, measured in the same run (as root, podman on vfs with
its own storage in a temporary directory and private tmpfs over its global state dirs).

    .venv/bin/python -m bench.images [--image py3] [--runs 3]

Rows: a fully cached rebuild (every step CACHED) of a small recipe, loading and saving an
image archive. Prints a markdown table of medians; ratios are the meaningful part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandbox.images.layers import remove_tree

SANDBOX = str(Path(sys.executable).parent / "sandbox")
RECIPE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN echo one > /one
RUN echo two > /two
ENV PATH=/bin
"""
PRIVATE = ("mount -t tmpfs none /var/lib/containers && mount -t tmpfs none /run/containers "
           '&& exec "$@"')


def median(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="busybox", help="image of the default store to load")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("podman"):
        sys.exit("run as root with podman installed")
    created = [p for p in ("/var/lib/containers", "/run/containers") if not os.path.isdir(p)]
    for path in created:  # mount points for the private tmpfs
        os.makedirs(path)
    work = Path(tempfile.mkdtemp(prefix="sandbox-bench-images-"))
    env = {**os.environ, "SANDBOX_HOME": str(work / "store")}

    def ours(*argv: str) -> None:
        subprocess.run([SANDBOX, *argv], env=env, check=True, capture_output=True)

    def podman(*argv: str) -> None:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE,
                        "sh", "podman", "--root", str(work / "proot"), "--runroot",
                        str(work / "prun"), "--tmpdir", str(work / "plib"), "--storage-driver",
                        "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs",
                        *argv], check=True, capture_output=True,
                       env={**os.environ, "TMPDIR": str(work)})

    try:
        ctx = work / "ctx"
        ctx.mkdir()
        shutil.copy("/bin/busybox", ctx / "busybox")
        (ctx / "Sandboxfile").write_text(RECIPE)
        (ctx / "Containerfile").write_text(RECIPE)
        ours("build", "-t", "bench", str(ctx))
        podman("build", "--isolation", "chroot", "-t", "bench", str(ctx))
        rows = [("cached rebuild, 6 steps",
                 median(lambda: ours("build", "-t", "bench", str(ctx)), args.runs),
                 median(lambda: podman("build", "--isolation", "chroot", "-t", "bench",
                                       str(ctx)), args.runs))]
        archive = work / "image.tar"
        subprocess.run([SANDBOX, "image", "save", args.image, "-o", str(archive)], check=True)
        size = archive.stat().st_size / 1e6

        def load_ours() -> None:
            shutil.rmtree(work / "store", ignore_errors=True)
            ours("image", "load", "-i", str(archive))

        def load_podman() -> None:
            podman("rmi", "-a", "-f")
            podman("load", "-i", str(archive))

        rows.append((f"load {args.image} ({size:.0f} MB)", median(load_ours, args.runs),
                     median(load_podman, args.runs)))
        rows.append((f"save {args.image}",
                     median(lambda: ours("image", "save", args.image, "-o",
                                         str(work / "o.tar")), args.runs),
                     median(lambda: podman("save", "--format", "oci-archive", "-o",
                                           str(work / "p.tar"), f"localhost/{args.image}"),
                            args.runs)))
        print("| operation | sandbox | podman (vfs) | ratio |\n|---|---|---|---|")
        for name, a, b in rows:
            print(f"| {name} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {a / b:.2f} |")
    finally:
        remove_tree(work)
        for path in created:
            os.rmdir(path)


if __name__ == "__main__":
    main()
