"""Fixtures for image tests: a tiny image made from the host's static busybox (no network
needed), and a fresh store per test, as root and as the unprivileged test user."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.images.layers import remove_tree
from tests.conftest import NO_DAEMON, Runner, need

TINY_RECIPE = """\
# a tiny image from the host's static busybox: FROM scratch, one COPY, one RUN
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
WORKDIR /work
"""


def _static_busybox() -> Path:
    path = Path("/bin/busybox")
    need(path.is_file(), "busybox-static is not installed (/bin/busybox)")
    need(not _has_interpreter(path.read_bytes()), "/bin/busybox is not statically linked "
         "(install busybox-static)")
    return path


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF asks for a dynamic loader (a PT_INTERP header)."""
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    size, count = int.from_bytes(elf[0x36:0x38], "little"), int.from_bytes(elf[0x38:0x3A],
                                                                             "little")
    return any(int.from_bytes(elf[phoff + i * size:phoff + i * size + 4], "little") == 3
               for i in range(count))


@pytest.fixture(scope="session")
def tiny_archive() -> Iterator[Path]:
    """An OCI archive of ``tiny`` (busybox on scratch), built once per session by root in
    a store of its own and readable by the unprivileged test user."""
    work = Path(tempfile.mkdtemp(prefix="sandbox-tiny-"))
    work.chmod(0o755)
    ctx = work / "ctx"
    ctx.mkdir()
    shutil.copy(_static_busybox(), ctx / "busybox")
    (ctx / "Sandboxfile").write_text(TINY_RECIPE)
    builder = Runner(None, Path.home(), {**NO_DAEMON, "SANDBOX_HOME": str(work / "store")})
    builder.run(["build", "-t", "tiny", str(ctx)], check=True, timeout=300)
    out = work / "tiny.tar"
    builder.run(["image", "save", "tiny", "-o", str(out)], check=True)
    out.chmod(0o644)
    yield out
    remove_tree(work)


def store_of(runner: Runner, tiny: Path | None) -> tuple[Runner, Path]:
    """``runner`` with a fresh SANDBOX_HOME of its own (holding ``tiny`` when given)."""
    work = Path(tempfile.mkdtemp(prefix="sandbox-store-"))
    work.chmod(0o755)
    home = work / "home"
    home.mkdir()
    if runner.user is not None:
        pw = pwd.getpwnam(runner.user)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    fresh = Runner(runner.user, runner.home, {**runner.env, "SANDBOX_HOME": str(home)})
    if tiny is not None:
        fresh.run(["image", "load", "-i", str(tiny)], check=True)
    return fresh, home


@pytest.fixture(params=["root", "user"])
def store_runner(request: pytest.FixtureRequest, tiny_archive: Path) -> Iterator[Runner]:
    """The CLI as root, then as the test user, each with a fresh store holding ``tiny``."""
    base = (Runner(None, Path.home(), dict(NO_DAEMON)) if request.param == "root"
            else request.getfixturevalue("user_runner"))
    runner, home = store_of(base, tiny_archive)
    yield runner
    remove_tree(home.parent)


@pytest.fixture
def root_store(tiny_archive: Path) -> Iterator[Runner]:
    """The CLI as root with a fresh store holding ``tiny``."""
    runner, home = store_of(Runner(None, Path.home(), dict(NO_DAEMON)), tiny_archive)
    yield runner
    remove_tree(home.parent)


@pytest.fixture
def context(shared_tmp: Path) -> Path:
    """A build context directory both users can read."""
    return shared_tmp
