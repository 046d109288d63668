"""Layer tars <-> directories: OCI whiteouts and opaque dirs <-> their overlay forms."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.images import layers
from tests.layertools import (
    describe,
    directory,
    file,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
)


def unpack(data: bytes, target: Path) -> Path:
    target.mkdir(exist_ok=True)
    layers.unpack(io.BytesIO(data), target)
    return target


def pack(source: Path) -> tuple[bytes, str]:
    out = io.BytesIO()
    diff_id = layers.pack(source, out)
    return out.getvalue(), diff_id


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def test_whiteouts_and_opaque_markers_become_overlay_forms(tmp_path: Path) -> None:
    tree = unpack(tar_bytes([directory("etc"), whiteout("etc/passwd"), directory("opt"),
                             opaque("opt"), file("opt/new", b"n"), whiteout("gone-dir")]),
                  tmp_path / "t")
    assert describe(tree) == {
        "etc": ("dir", 0o755, False), "etc/passwd": ("whiteout",),
        "opt": ("dir", 0o755, True), "opt/new": ("file", 0o644, b"n"),
        "gone-dir": ("whiteout",),
    }


def test_an_entry_of_the_same_layer_wins_over_its_whiteout(tmp_path: Path) -> None:
    # OCI: a whiteout only hides lower layers; whatever order the tar has
    tree = unpack(tar_bytes([whiteout("a"), file("a", b"kept"), file("b", b"kept"),
                             whiteout("b")]), tmp_path / "t")
    assert describe(tree) == {"a": ("file", 0o644, b"kept"), "b": ("file", 0o644, b"kept")}


def test_opaque_marker_at_the_root(tmp_path: Path) -> None:
    tree = unpack(tar_bytes([opaque(""), file("x")]), tmp_path / "t")
    assert os.getxattr(tree, layers.OPAQUE_XATTR) == b"y"


def test_directory_modes_are_applied_after_their_content(tmp_path: Path) -> None:
    tree = unpack(tar_bytes([directory("ro", 0o555), file("ro/f", b"x"),
                             directory("tmp", 0o1777)]), tmp_path / "t")
    got = describe(tree)
    assert got["ro"] == ("dir", 0o555, False) and got["ro/f"] == ("file", 0o644, b"x")
    assert got["tmp"] == ("dir", 0o1777, False)


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    tree = unpack(tar_bytes([file("x", b"1"), file("x", b"2"), directory("d"), file("d/f"),
                             file("d", b"now a file"), symlink("s", "x"), file("s", b"3")]),
                  tmp_path / "t")
    assert describe(tree) == {"x": ("file", 0o644, b"2"), "d": ("file", 0o644, b"now a file"),
                              "s": ("file", 0o644, b"3")}


def make_upper(root: Path) -> Path:
    """An overlay upper dir as a RUN step leaves it."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    os.mknod(root / "etc/shadow", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # deleted
    (root / "opt/app").mkdir(parents=True)
    os.setxattr(root / "opt/app", layers.OPAQUE_XATTR, b"y")               # rm -r + mkdir
    (root / "opt/app/run.sh").write_text("#!/bin/sh\n")
    (root / "opt/app/run.sh").chmod(0o755)
    os.symlink("/opt/app/run.sh", root / "opt/run")
    os.mkfifo(root / "opt/fifo")
    os.mknod(root / "gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    return root


def test_pack_writes_oci_whiteouts_and_opaque_markers(tmp_path: Path) -> None:
    data, diff_id = pack(make_upper(tmp_path / "upper"))
    assert diff_id.startswith("sha256:")
    listing = names(data)
    assert "etc/.wh.shadow" in listing and "etc/shadow" not in listing
    assert "opt/app/.wh..wh..opq" in listing and ".wh.gone" in listing
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert all(m.uid == 0 and m.gid == 0 for m in tar.getmembers())


def test_pack_then_unpack_round_trips(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    data, _ = pack(upper)
    assert describe(unpack(data, tmp_path / "back")) == describe(upper)


def test_pack_is_deterministic_for_the_same_tree(tmp_path: Path) -> None:
    upper = make_upper(tmp_path / "upper")
    assert pack(upper) == pack(upper)


def test_merged_lookup_honours_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    low = unpack(tar_bytes([directory("etc"), file("etc/a"), file("etc/b"), directory("d"),
                            file("d/old"), symlink("link", "/etc")]), tmp_path / "low")
    top = unpack(tar_bytes([directory("etc"), whiteout("etc/a"), directory("d"), opaque("d"),
                            file("d/new")]), tmp_path / "top")
    lower = [str(top), str(low)]
    assert layers.merged_lookup(lower, "etc/a") is None
    assert layers.merged_lookup(lower, "etc/b") == str(low / "etc/b")
    assert layers.merged_lookup(lower, "d/old") is None
    assert layers.merged_lookup(lower, "d/new") == str(top / "d/new")
    assert layers.merged_lookup(lower, "link/b") is None  # never through a symlink
    assert layers.merged_lookup(lower, "missing") is None


_NAMES = st.sampled_from(["a", "b", "a/b", "a/c", "d/e/f", "x y", ".hidden"])


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[str, str, bytes]]:
    kinds = st.sampled_from(["file", "dir", "symlink", "whiteout", "opaque-dir"])
    return draw(st.lists(st.tuples(_NAMES, kinds, st.binary(max_size=64)), max_size=12))


@settings(max_examples=60, deadline=None)
@given(trees())
def test_round_trip_of_arbitrary_upper_dirs(spec: list[tuple[str, str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        upper = Path(tmp) / "upper"
        upper.mkdir()
        for name, kind, data in spec:
            path = upper / name
            if any((p.exists() and not p.is_dir()) or p.is_symlink() for p in path.parents
                   if upper in p.parents):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path):
                continue
            if kind == "file":
                path.write_bytes(data)
            elif kind == "dir":
                path.mkdir()
            elif kind == "opaque-dir":
                path.mkdir()
                os.setxattr(path, layers.OPAQUE_XATTR, b"y")
            elif kind == "symlink":
                os.symlink(data.hex() or "target", path)
            else:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        data_out, _ = pack(upper)
        back = Path(tmp) / "back"
        back.mkdir()
        layers.unpack(io.BytesIO(data_out), back)
        assert describe(back) == describe(upper)
