"""Image archives without sandboxes: save and load both formats, every compression,
names, and what an archive must contain."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sandbox.errors import ImageError
from sandbox.images import archive
from sandbox.images.store import Store
from tests.layertools import (
    compress,
    describe,
    directory,
    docker_archive,
    file,
    image_blobs,
    oci_archive,
    opaque,
    sha,
    tar_bytes,
    whiteout,
)

LAYERS = [tar_bytes([directory("data"), file("data/a", b"a"), file("data/b", b"b"),
                     directory("data/d"), file("data/d/old", b"old")]),
          tar_bytes([directory("data"), whiteout("data/a"), directory("data/d"), opaque("data/d"),
                     file("data/d/new", b"new")])]


def load(store: Store, tmp_path: Path, data: bytes, tag: str | None = None) -> list[str]:
    path = tmp_path / "in.tar"
    path.write_bytes(data)
    return [i.ref for i in archive.load(store, path, tag)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def top_layer(store: Store, ref: str) -> dict[str, tuple[object, ...]]:
    return describe(Path(store.resolve(ref).lower_dirs()[0]))


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
@pytest.mark.parametrize("outer", ["", "gzip", "zstd"])
def test_loads_oci_archives(store: Store, tmp_path: Path, compression: str, outer: str) -> None:
    data = compress(oci_archive(LAYERS, "localhost/app:1.0", compression), outer)
    assert load(store, tmp_path, data) == ["localhost/app:1.0"]  # podman's name, kept
    image = store.resolve("app:1.0")  # and found by its short name
    assert [layer.media_type.rsplit(".", 1)[-1] for layer in image.layers] == [
        {"": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}[compression]] * 2
    assert top_layer(store, "app:1.0") == {
        "data": ("dir", 0o755, False), "data/a": ("whiteout",), "data/d": ("dir", 0o755, True),
        "data/d/new": ("file", 0o644, b"new")}


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
def test_loads_docker_archives(store: Store, tmp_path: Path, compression: str) -> None:
    data = docker_archive(LAYERS, ["localhost/app:1.0", "docker.io/library/app:latest"],
                          compression)
    assert load(store, tmp_path, data) == ["localhost/app:1.0", "docker.io/library/app:latest"]
    assert store.resolve("app:1.0").layers[0].diff_id == sha(LAYERS[0])


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_save_then_load_round_trips(store: Store, tmp_path: Path, fmt: str) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1.0", "gzip"))
    out = tmp_path / f"saved-{fmt}.tar"
    archive.save(store, "app:1.0", out, fmt)
    other = Store(tmp_path / "other")
    assert [i.ref for i in archive.load(other, out)] == ["localhost/app:1.0"]  # as saved
    before, after = store.resolve("app:1.0"), other.resolve("app:1.0")
    assert after.id == before.id  # the same config
    assert [x.diff_id for x in after.layers] == [x.diff_id for x in before.layers]
    assert top_layer(other, "app:1.0") == top_layer(store, "app:1.0")
    if fmt == "oci":
        assert after.manifest_digest == before.manifest_digest  # blobs kept as they were


def test_saved_oci_archive_carries_the_full_reference(store: Store, tmp_path: Path) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1.0"))
    out = tmp_path / "out.tar"
    archive.save(store, "app:1.0", out)
    with tarfile.open(out) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        names = tar.getnames()
    notes = index["manifests"][0]["annotations"]
    assert notes == {"org.opencontainers.image.ref.name": "localhost/app:1.0",
                     "io.containerd.image.name": "localhost/app:1.0",
                     "sandbox.image.name": "localhost/app:1.0"}
    assert names[:2] == ["oci-layout", "index.json"]


def test_saved_docker_archive_has_plain_layers_and_repo_tags(store: Store,
                                                             tmp_path: Path) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1.0", "zstd"))
    out = tmp_path / "out.tar"
    archive.save(store, "app:1.0", out, "docker")
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer0 = tar.extractfile(manifest[0]["Layers"][0]).read()  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["localhost/app:1.0"]
    assert layer0 == LAYERS[0]


@pytest.mark.parametrize(("ref", "full"), [
    ("py3", "localhost/py3:latest"), ("team/app:2", "localhost/team/app:2"),
    ("localhost/x:1", "localhost/x:1"), ("127.0.0.1:5000/x:1", "127.0.0.1:5000/x:1"),
    ("registry.example/a/b:c", "registry.example/a/b:c"),
])
def test_full_references(ref: str, full: str) -> None:
    assert archive.full_reference(ref) == full
    assert archive.local_name(full) == full


def test_names_from_the_containerd_annotation_or_the_tag_option(store: Store,
                                                                 tmp_path: Path) -> None:
    tag_only = oci_archive(LAYERS, "latest")  # the OCI spec's shape: just a tag
    with pytest.raises(ImageError, match="has no name; give one with --tag"):
        load(store, tmp_path, tag_only)
    assert store.refs() == []
    assert load(store, tmp_path, tag_only, tag="mine:1") == ["mine:1"]
    containerd = oci_archive(LAYERS, "latest", annotations={
        "io.containerd.image.name": "docker.io/library/app:latest"})
    assert load(store, tmp_path, containerd) == ["docker.io/library/app:latest"]
    assert load(store, tmp_path, oci_archive(LAYERS, None), tag="x") == ["x:latest"]


def test_picks_this_machines_manifest_from_an_index(store: Store, tmp_path: Path) -> None:
    manifest, config, blobs = image_blobs(LAYERS)
    other, _, _ = image_blobs([tar_bytes([file("arm")])])
    nested = json.dumps({"schemaVersion": 2,
                         "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [
                             {"digest": sha(other), "size": len(other),
                              "platform": {"architecture": "arm64", "os": "linux"}},
                             {"digest": sha(manifest), "size": len(manifest),
                              "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha(nested),
         "size": len(nested),
         "annotations": {"org.opencontainers.image.ref.name": "localhost/multi:1"}}]}
    entries = [file("oci-layout", b"{}"), file("index.json", json.dumps(index).encode())]
    entries += [file(f"blobs/sha256/{sha(b)[7:]}", b)
                for b in [nested, manifest, other, config, *blobs]]
    assert load(store, tmp_path, tar_bytes(entries)) == ["localhost/multi:1"]
    assert store.resolve("multi:1").manifest_digest == sha(manifest)


@pytest.mark.parametrize(("data", "message"), [
    (b"not an archive at all", "not a tar archive"),
    (tar_bytes([file("hello")]), "neither an OCI archive"),
    (tar_bytes([file("index.json", b"{")]), "not valid JSON"),
    (tar_bytes([file("index.json", b"{}")]), "no manifest list"),
    (tar_bytes([file("manifest.json", b"{}")]), "not a list"),
])
def test_malformed_archives_are_one_line_errors(store: Store, tmp_path: Path, data: bytes,
                                                message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        load(store, tmp_path, data)
    assert "\n" not in str(info.value)


def test_save_is_atomic_and_checks_its_target(store: Store, tmp_path: Path) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1"))
    with pytest.raises(ImageError, match="does not exist"):
        archive.save(store, "app:1", tmp_path / "missing-dir" / "x.tar")
    with pytest.raises(ImageError, match="not found"):
        archive.save(store, "nope", tmp_path / "x.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar", "store"]


def test_unwritable_targets_are_one_line_errors(store: Store, tmp_path: Path) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1"))
    with pytest.raises(ImageError, match=r"cannot write /proc/x\.tar: ") as info:
        archive.save(store, "app:1", Path("/proc/x.tar"))  # not even root may create it
    assert "\n" not in str(info.value)


def test_our_own_archives_keep_the_name_they_were_saved_under(store: Store,
                                                              tmp_path: Path) -> None:
    load(store, tmp_path, oci_archive(LAYERS, "localhost/app:1.0"))
    store.tag("app:1.0", "mine:2")
    out = tmp_path / "mine.tar"
    archive.save(store, "mine:2", out)
    other = Store(tmp_path / "other")
    assert [i.ref for i in archive.load(other, out)] == ["mine:2"]  # not localhost/mine:2
