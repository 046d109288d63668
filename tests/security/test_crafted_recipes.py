"""Crafted recipes and build contexts: COPY and ADD never reach outside the context, an
ADDed tar goes through the layer unpacker's checks, RUN gets no network it was not given.
These steps need no sandbox, so the builder runs here without one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from sandbox.errors import ImageError, UnsafeLayerError
from sandbox.images import build
from sandbox.images.store import Image, Store
from sandbox.supervisor.core import Supervisor
from tests.layertools import describe, file, symlink, tar_bytes


def run_build(tmp_path: Path, recipe: str, **kw: object) -> Image:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Sandboxfile").write_text(recipe)
    sup = Supervisor(store=Store(tmp_path / "store"))
    return trio.run(lambda: build.build(sup, ctx, "crafted", **kw))  # type: ignore[arg-type]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_text("host data")
    return path


@pytest.mark.parametrize("source", ["../outside/secret", "link/secret", "dirlink",
                                    "{outside}/secret"])
def test_copy_never_reads_outside_the_context(tmp_path: Path, outside: Path,
                                              source: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    os.symlink(outside, ctx / "link")
    os.symlink("../outside", ctx / "dirlink")
    with pytest.raises(ImageError, match=r"Sandboxfile:2: .* (is outside the build context|does "
                                         "not exist in the build context)"):
        run_build(tmp_path, f"FROM scratch\nCOPY {source.format(outside=outside)} /x\n")
    assert Store(tmp_path / "store").refs() == []


def test_add_extracts_a_tar_through_the_unpackers_checks(tmp_path: Path, outside: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "ok.tar").write_bytes(tar_bytes([file("a", b"a"), symlink("l", "/etc")]))
    image = run_build(tmp_path, "FROM scratch\nADD ok.tar /srv\n")
    assert describe(Path(image.lower_dirs()[0])) == {
        "srv": ("dir", 0o755, False), "srv/a": ("file", 0o644, b"a"),
        "srv/l": ("symlink", "/etc")}
    (ctx / "evil.tar").write_bytes(tar_bytes([symlink("l", str(outside)),
                                              file("l/planted", b"x")]))
    with pytest.raises(UnsafeLayerError, match="below a symlink"):
        run_build(tmp_path, "FROM scratch\nADD evil.tar /srv\n")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_add_from_a_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Sandboxfile:2: ADD from a URL is not supported"):
        run_build(tmp_path, "FROM scratch\nADD http://example.com/x.tar /x\n")


def test_run_gets_the_network_only_from_the_build(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Sandboxfile:2: RUN --network=host needs the build "
                                         "to allow it"):
        run_build(tmp_path, "FROM scratch\nRUN --network=host true\n")


def test_from_flags_only_for_debian_bootstraps(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Sandboxfile:1: FROM --include only applies to"):
        run_build(tmp_path, "FROM --include=gcc scratch\n")
    with pytest.raises(ImageError, match="multi-stage"):
        run_build(tmp_path, "FROM scratch AS build\n")
