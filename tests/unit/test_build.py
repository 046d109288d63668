"""The builder's own parts that need no sandbox: per-step output and the cache of COPY and
ADD steps (RUN steps are covered in tests/integration/images/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sandbox.errors import ImageError
from sandbox.images import build
from sandbox.images.store import Image, Store
from sandbox.supervisor.core import Supervisor

RECIPE = """\
FROM scratch
COPY a.txt /a.txt
ENV X=1
COPY dir /dir
"""


def run_build(ctx: Path, store: Store, no_cache: bool = False) -> tuple[Image, list[str]]:
    lines: list[str] = []
    sup = Supervisor(store=store)

    async def main() -> Image:
        return await build.build(sup, ctx, "copies", progress=lines.append, no_cache=no_cache)

    return trio.run(main), lines


def steps(lines: list[str]) -> list[str]:
    """The outcome of each step: CACHED or done."""
    return [line.split()[1] for line in lines if line.startswith(" ---> ")]


def test_step_output_and_cache_hits_and_misses(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "dir").mkdir(parents=True)
    (ctx / "Sandboxfile").write_text(RECIPE)
    (ctx / "a.txt").write_text("a")
    (ctx / "dir/b.txt").write_text("b")
    store = Store(tmp_path / "store")
    first, lines = run_build(ctx, store)
    assert [line for line in lines if line.startswith("Step")] == [
        "Step 1/4 : FROM scratch", "Step 2/4 : COPY a.txt /a.txt", "Step 3/4 : ENV X=1",
        "Step 4/4 : COPY dir /dir"]
    assert steps(lines) == ["done", "done", "done", "done"]
    assert all(line.endswith("s") for line in lines if line.startswith(" ---> done in"))
    assert lines[-1] == f"Successfully built {first.id[7:19]} as copies:latest"

    again, lines = run_build(ctx, store)
    assert steps(lines) == ["done", "CACHED", "done", "CACHED"]
    assert again.layers == first.layers

    (ctx / "dir/b.txt").write_text("changed")  # only the last COPY's input changed
    changed, lines = run_build(ctx, store)
    assert steps(lines) == ["done", "CACHED", "done", "done"]
    assert changed.layers[0] == first.layers[0] and changed.layers[1] != first.layers[1]

    (ctx / "a.txt").chmod(0o600)  # modes are inputs too; the later step's parent changed
    _, lines = run_build(ctx, store)
    assert steps(lines) == ["done", "done", "done", "done"]

    _, lines = run_build(ctx, store, no_cache=True)
    assert "CACHED" not in steps(lines)


def test_a_missing_base_image_names_the_line(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Sandboxfile").write_text("FROM no-such-image\n")
    with pytest.raises(ImageError, match=r"Sandboxfile:1: image 'no-such-image' not found"):
        run_build(ctx, Store(tmp_path / "store"))


def test_bootstrap_commands_keep_the_hosts_files_out() -> None:
    full = build.bootstrap_command("bookworm", {"variant": "custom", "include": "dash"}, "o")
    assert full[-2:] == ["bookworm", "o"] and "--include=dash" in full
    assert any(a.startswith("--customize-hook=rm -f \"$1/etc/resolv.conf\"") for a in full)
    assert "--dpkgopt=path-exclude=/usr/share/man/*" in full  # no docs, man pages, locales
    extract = build.bootstrap_command("bookworm", {"variant": "extract"}, "o")
    # mmdebstrap runs no customize hooks for the extract variant
    assert any(a.startswith("--setup-hook=rm -f") for a in extract)
    assert not any(a.startswith("--customize-hook") for a in extract)
