"""A crafted image: the attacker controls the image's files (symlinks where the sandbox
expects directories, a file where the job's program goes) and must not reach the host while
the sandbox is set up, before pivot_root, when host paths are still visible."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.security.conftest import Hostile


def _image_with(hostile: Hostile, context: Path, name: str,
                entries: list[tuple[str, str]]) -> str:
    """Build ``FROM busybox`` + ``ADD evil.tar /`` where the tar holds ``entries``
    (path, symlink target), as the hostile's user."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for path, target in entries:
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    context.mkdir(mode=0o755)
    (context / "evil.tar").write_bytes(data.getvalue())
    (context / "Sandboxfile").write_text("FROM busybox\nADD evil.tar /\n")
    for p in (context / "evil.tar", context / "Sandboxfile"):
        p.chmod(0o644)
    tag = f"evil-{name}-{hostile.token[-6:]}"
    proc = hostile.runner.run(["build", "-t", tag, str(context)], timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return tag


@pytest.fixture
def target(hostile: Hostile, shared_tmp: Path) -> Path:
    """A host directory owned by the hostile's user (so that the user's own sandbox could
    change it), mode 0700."""
    path = shared_tmp / "target"
    path.mkdir(mode=0o700)
    (path / "file").write_text("mine\n")
    if hostile.runner.user is not None:
        import pwd

        pw = pwd.getpwnam(hostile.runner.user)
        for p in (path, path / "file"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    return path


@pytest.mark.parametrize("where", ["tmp", "work", "proc", "dev", "work-relative"])
def test_image_symlinks_where_the_sandbox_makes_dirs(hostile: Hostile, shared_tmp: Path,
                                                     target: Path, where: str) -> None:
    """/tmp, /work, /proc or /dev as a symlink to a host directory: the set-up must not
    chmod, chown or mount through it (the fixture also checks the session's victim)."""
    before = {p.name: (p.stat().st_mode, p.stat().st_uid, p.stat().st_ctime_ns)
              for p in (target, target / "file")}
    link = str(target)
    if where == "work-relative":
        link = "../" * 16 + str(target).lstrip("/")
    tag = _image_with(hostile, shared_tmp / "ctx", where,
                      [(where.split("-")[0], link)])
    try:
        r = hostile.exec("sh", "-c", "ls -la /; echo x > /tmp/x; echo x > /work/x",
                         image=tag)
    finally:
        hostile.runner.run(["image", "rm", tag])
    after = {p.name: (p.stat().st_mode, p.stat().st_uid, p.stat().st_ctime_ns)
             for p in (target, target / "file")}
    assert after == before, "the host directory was changed through the image's symlink"
    assert sorted(os.listdir(target)) == ["file"]
    if r["status"] == "internal_error":
        assert r["cli_exit"] == 125 and "symlink" in r["message"], r


def test_image_file_where_the_program_is_copied(hostile: Hostile, shared_tmp: Path,
                                                target: Path) -> None:
    """The image already has /work/PROGRAM, a symlink to a host file: copying the program in
    must not write through it."""
    before = (target / "file").read_text(), (target / "file").stat().st_ctime_ns
    tag = _image_with(hostile, shared_tmp / "ctx", "workfile",
                      [("work/hostile", str(target / "file"))])
    try:
        r = hostile.exec(str(hostile.bin), "fdscan", image=tag)
    finally:
        hostile.runner.run(["image", "rm", tag])
    assert ((target / "file").read_text(), (target / "file").stat().st_ctime_ns) == before
    assert r["status"] == "internal_error" and r["cli_exit"] == 125, r
