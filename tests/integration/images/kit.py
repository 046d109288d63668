"""Helpers for image tests: builds through the CLI, a store's files, layer listings."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.conftest import Runner

# A recipe of five layers (tiny's two, then three RUN steps) whose later layers delete
# files and dirs and recreate a directory (opaque), and what a job must see of it.
FIVE_LAYERS = """\
FROM tiny
RUN mkdir -p /data/keep /data/gone /data/opq && echo a > /data/keep/a && echo x > /data/keep/x \
    && echo b > /data/gone/b && echo old > /data/opq/old && echo f > /data/file
RUN rm -r /data/gone /data/file /data/keep/x
RUN rm -r /data/opq && mkdir /data/opq && echo new > /data/opq/new && echo again > /data/file
"""
VIEW = "find /data | sort; cat /data/keep/a /data/opq/new /data/file; ls -a /data/opq"
EXPECTED = ("/data\n/data/file\n/data/keep\n/data/keep/a\n/data/opq\n/data/opq/new\n"
            "a\nnew\nagain\n.\n..\nnew\n")


def store_home(runner: Runner) -> Path:
    return Path(runner.env["SANDBOX_HOME"])


def write_recipe(context: Path, text: str, **files: str) -> Path:
    context.mkdir(parents=True, exist_ok=True)
    context.chmod(0o755)
    (context / "Sandboxfile").write_text(text)
    for name, content in files.items():
        (context / name).write_text(content)
        (context / name).chmod(0o644)
    return context


def build(runner: Runner, context: Path, tag: str, *flags: str, check: bool = True,
          timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return runner.run(["build", "-t", tag, *flags, str(context)], check=check, timeout=timeout)


def outcomes(stderr: bytes) -> list[str]:
    """The outcome of each build step in the output: ``CACHED`` or ``done``."""
    return [line.split()[1] for line in stderr.decode().splitlines()
            if line.startswith(" ---> ") and line.split()[1] in ("CACHED", "done")]


def inspect(runner: Runner, name: str) -> dict[str, Any]:
    return json.loads(runner.run(["image", "inspect", name], check=True).stdout)  # type: ignore[no-any-return]


def layer_names(runner: Runner, digest: str) -> list[str]:
    """The entry names of a layer blob in the runner's store."""
    with tarfile.open(store_home(runner) / "blobs" / "sha256" / digest[7:]) as tar:
        return tar.getnames()


def staging_left(runner: Runner) -> list[str]:
    tmp = store_home(runner) / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
