"""Crafted layer tars and image archives: the unpacker and the loader never write outside
their target, whatever the archive says (a crafted image is untrusted input)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.errors import ImageError, UnsafeLayerError
from sandbox.images import archive, layers
from sandbox.images.store import Store
from tests.layertools import (
    Entry,
    describe,
    device,
    directory,
    docker_archive,
    file,
    hardlink,
    image_blobs,
    oci_archive,
    opaque,
    sha,
    symlink,
    tar_bytes,
    whiteout,
)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the unpack target that must never change."""
    path = tmp_path / "outside"
    path.mkdir(mode=0o700)
    (path / "secret").write_text("host data")
    before = describe(path), stat.S_IMODE(path.stat().st_mode)
    yield path
    assert (describe(path), stat.S_IMODE(path.stat().st_mode)) == before
    assert {p.name for p in tmp_path.iterdir()} <= {"layer", "outside"}


def unpack(entries: list[Entry], target: Path, **bounds: int) -> Path:
    target.mkdir(exist_ok=True)
    layers.unpack(io.BytesIO(tar_bytes(entries)), target, **bounds)
    return target


@pytest.mark.parametrize("name", ["/abs-escape", "{outside}/evil"])
def test_absolute_paths_are_refused(tmp_path: Path, outside: Path, name: str) -> None:
    with pytest.raises(UnsafeLayerError, match="outside the layer"):
        unpack([file(name.format(outside=outside), b"x")], tmp_path / "layer")
    assert not Path("/abs-escape").exists()


@pytest.mark.parametrize("name", ["../outside/evil", "a/../../outside/evil", "./../x"])
def test_dotdot_is_refused(tmp_path: Path, outside: Path, name: str) -> None:
    with pytest.raises(UnsafeLayerError, match="outside the layer"):
        unpack([directory("a"), file(name, b"x")], tmp_path / "layer")


@pytest.mark.parametrize("target", ["{outside}", "../outside", "."])
def test_entries_under_a_symlinked_parent_are_refused(tmp_path: Path, outside: Path,
                                                       target: str) -> None:
    with pytest.raises(UnsafeLayerError, match="below a symlink"):
        unpack([symlink("link", target.format(outside=outside)), file("link/evil", b"x")],
               tmp_path / "layer")


@pytest.mark.parametrize("entries", [
    [hardlink("h", "../outside/secret")],
    [hardlink("h", "{outside}/secret")],
    [symlink("l", "{outside}"), hardlink("h", "l/secret")],
    [symlink("s", "{outside}/secret"), hardlink("h", "s")],
    [hardlink("h", "missing")],
], ids=["dotdot", "absolute", "via-symlinked-dir", "to-a-symlink", "dangling"])
def test_hardlinks_pointing_outside_are_refused(tmp_path: Path, outside: Path,
                                                entries: list[Entry]) -> None:
    for entry in entries:
        entry.info.linkname = entry.info.linkname.format(outside=outside)
    with pytest.raises(UnsafeLayerError):
        unpack(entries, tmp_path / "layer")


def test_hardlinks_inside_the_layer_work(tmp_path: Path, outside: Path) -> None:
    tree = unpack([file("a", b"data"), hardlink("b", "a")], tmp_path / "layer")
    assert os.stat(tree / "a").st_ino == os.stat(tree / "b").st_ino


def test_device_nodes_are_dropped(tmp_path: Path, outside: Path) -> None:
    tree = unpack([device("null", major=1, minor=3), device("sda", b"4", 8, 0),
                   device("fake-whiteout", major=0, minor=0), file("kept", b"k")],
                  tmp_path / "layer")
    assert describe(tree) == {"kept": ("file", 0o644, b"k")}


def test_archives_over_the_size_bound_are_refused(tmp_path: Path, outside: Path) -> None:
    with pytest.raises(UnsafeLayerError, match="more than 1000 bytes"):
        unpack([file("a", b"x" * 600), file("b", b"x" * 600)], tmp_path / "layer",
               max_bytes=1000)
    assert not (tmp_path / "layer" / "b").exists()  # refused before it was written


def test_too_many_entries_are_refused(tmp_path: Path, outside: Path) -> None:
    with pytest.raises(UnsafeLayerError, match="more than 10 entries"):
        unpack([file(f"f{i}") for i in range(11)], tmp_path / "layer", max_entries=10)


def test_setuid_and_setgid_bits_are_dropped(tmp_path: Path, outside: Path) -> None:
    tree = unpack([file("suid", b"#!", 0o4755), file("sgid", b"#!", 0o2755),
                   directory("d", 0o3777)], tmp_path / "layer")
    assert describe(tree) == {"suid": ("file", 0o755, b"#!"), "sgid": ("file", 0o755, b"#!"),
                              "d": ("dir", 0o1777, False)}


def test_a_directory_replaced_by_a_symlink_does_not_chmod_its_target(tmp_path: Path,
                                                                     outside: Path) -> None:
    # the directory's mode is applied at the end: it must not follow the later symlink
    tree = unpack([directory("d", 0o777), symlink("d", str(outside))], tmp_path / "layer")
    assert describe(tree) == {"d": ("symlink", str(outside))}


@pytest.mark.parametrize("marker", [opaque("l"), whiteout("l/secret")], ids=["opaque",
                                                                             "whiteout"])
def test_whiteouts_below_a_symlink_are_refused(tmp_path: Path, outside: Path,
                                               marker: Entry) -> None:
    with pytest.raises(UnsafeLayerError, match="below a symlink"):
        unpack([symlink("l", str(outside)), marker], tmp_path / "layer")


def test_decompressed_size_is_bounded_in_the_store(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # a gzip bomb: 64 MiB of zeros after the tar's end, about 64 KiB compressed
    bomb = gzip.compress(tar_bytes([file("a", b"x")]) + bytes(64 << 20))
    store = Store(tmp_path / "store")
    digest = store.put_blob(bomb)
    monkeypatch.setenv("SANDBOX_MAX_LAYER_SIZE", "1M")
    with pytest.raises(UnsafeLayerError, match="bound"):
        store.unpack_layer(digest, sha(gzip.decompress(bomb)))
    assert list((store.root / "layers").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []  # no half-unpacked layer left


_ENTRY_NAMES = st.sampled_from(["a", "a/b", "l", "l/x", "../x", "/x", "a/../../x", "d",
                                ".wh.a", "a/.wh..wh..opq", "l/.wh.x"])


@st.composite
def crafted(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    kinds = st.sampled_from(["file", "dir", "symlink-out", "symlink-in", "hardlink"])
    return draw(st.lists(st.tuples(_ENTRY_NAMES, kinds, _ENTRY_NAMES), max_size=10))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crafted())
def test_no_crafted_tar_writes_outside(spec: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "outside"
        outside.mkdir(mode=0o700)
        (outside / "x").write_text("host")
        before = describe(Path(tmp))
        entries = []
        for name, kind, other in spec:
            match kind:
                case "file":
                    entries.append(file(name, b"evil", 0o777))
                case "dir":
                    entries.append(directory(name, 0o777))
                case "symlink-out":
                    entries.append(symlink(name, str(outside)))
                case "symlink-in":
                    entries.append(symlink(name, other))
                case _:
                    entries.append(hardlink(name, other))
        target = Path(tmp) / "layer"
        target.mkdir()
        with contextlib.suppress(UnsafeLayerError):
            layers.unpack(io.BytesIO(tar_bytes(entries)), target)
        after = {k: v for k, v in describe(Path(tmp)).items() if not k.startswith("layer")}
        assert after == before
        assert stat.S_IMODE(outside.stat().st_mode) == 0o700


# ---------------------------------------------------------------------- image archives


def load(tmp_path: Path, data: bytes, tag: str | None = None) -> list[str]:
    path = tmp_path / "archive.tar"
    path.write_bytes(data)
    return [i.ref for i in archive.load(Store(tmp_path / "store"), path, tag)]


def test_archive_member_paths_are_never_followed_outside(tmp_path: Path) -> None:
    layer = tar_bytes([file("a", b"a")])
    data = tar_bytes([
        file("cfg.json", json.dumps({"rootfs": {"diff_ids": [sha(layer)]}}).encode()),
        file("manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": ["x:1"],
                                           "Layers": ["../../../etc/passwd"]}]).encode())])
    with pytest.raises(ImageError, match="missing"):
        load(tmp_path, data)
    link = tar_bytes([
        symlink("evil.tar", "../../etc/passwd"),
        file("cfg.json", json.dumps({"rootfs": {"diff_ids": [sha(layer)]}}).encode()),
        file("manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": ["x:1"],
                                           "Layers": ["evil.tar"]}]).encode())])
    with pytest.raises(ImageError, match="outside the archive"):
        load(tmp_path, link)
    assert Store(tmp_path / "store").refs() == []


def test_a_blob_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    real = tar_bytes([file("a", b"a")])
    manifest, config, _ = image_blobs([real])
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "localhost/x:1"}}]}
    data = tar_bytes([file("oci-layout", b"{}"), file("index.json", json.dumps(index).encode()),
                      file(f"blobs/sha256/{sha(manifest)[7:]}", manifest),
                      file(f"blobs/sha256/{sha(config)[7:]}", config),
                      file(f"blobs/sha256/{sha(real)[7:]}", tar_bytes([file("a", b"b")]))])
    with pytest.raises(ImageError, match="digest mismatch"):
        load(tmp_path, data)
    assert Store(tmp_path / "store").refs() == []


def test_layers_whose_content_does_not_match_the_config_are_refused(tmp_path: Path) -> None:
    data = docker_archive([tar_bytes([file("a", b"a")])], ["x:1"])
    lying = data.replace(sha(tar_bytes([file("a", b"a")]))[7:].encode(), b"0" * 64, 1)
    with pytest.raises(ImageError, match="diff_id"):
        load(tmp_path, lying)
    assert Store(tmp_path / "store").refs() == []


def test_a_crafted_layer_in_an_archive_is_refused_before_any_name_points_at_it(
        tmp_path: Path) -> None:
    data = oci_archive([tar_bytes([file("ok")]), tar_bytes([file("../escape", b"x")])],
                       "localhost/evil:1", compression="gzip")
    with pytest.raises(UnsafeLayerError, match="outside the layer"):
        load(tmp_path, data)
    assert Store(tmp_path / "store").refs() == []
    assert not (tmp_path / "escape").exists()


def test_a_hardlink_to_itself_is_refused(tmp_path: Path, outside: Path) -> None:
    # found by test_no_crafted_tar_writes_outside: tarfile itself failed on it
    with pytest.raises(UnsafeLayerError, match="points to itself"):
        unpack([file("a", b"x"), hardlink("a", "a")], tmp_path / "layer")
