"""The image store without sandboxes: blobs, tags, history, sizes, leases, prune, and
several processes at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sandbox.errors import ImageError
from sandbox.images import gc
from sandbox.images.store import Layer, Store
from tests.layertools import Entry, directory, file, tar_bytes

REPO = Path(__file__).resolve().parents[2]


def add_layer(store: Store, entries: list[Entry]) -> Layer:
    with store.tempdir() as tmp:
        path = Path(tmp) / "layer.tar"
        path.write_bytes(tar_bytes(entries))
        return store.import_layer_tar(path)


def history(*rows: tuple[str, bool]) -> list[dict[str, object]]:
    return [{"created": "2026-01-01T00:00:00Z", "created_by": by, "empty_layer": empty}
            for by, empty in rows]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.init()
    return s


@pytest.fixture
def two_images(store: Store) -> tuple[Layer, Layer, Layer]:
    base = add_layer(store, [directory("bin"), file("bin/tool", b"x" * 1000)])
    one = add_layer(store, [file("one", b"1" * 300)])
    two = add_layer(store, [file("two", b"2" * 500)])
    store.commit("one", [base, one], {"history": history(("FROM base", False),
                                                          ("ENV A=1", True),
                                                          ("RUN make one", False))})
    store.commit("two:v2", [base, two], {})
    return base, one, two


def test_blobs_are_verified_on_write(store: Store) -> None:
    digest = store.put_blob(b"data")
    assert store.read_blob(digest) == b"data"
    with pytest.raises(ImageError, match="digest mismatch"):
        store.put_blob(b"other", digest)


def test_layout_is_an_oci_image_layout(store: Store, two_images: object) -> None:
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    refs = sorted(m["annotations"]["org.opencontainers.image.ref.name"]
                  for m in store.read_index()["manifests"])
    assert refs == ["one:latest", "two:v2"]
    assert (store.root / "layers").stat().st_mode & 0o077 == 0  # layers are private


def test_history_pairs_instructions_with_layers(store: Store,
                                                two_images: tuple[Layer, ...]) -> None:
    base, one, _ = two_images
    rows = store.resolve("one").history()
    assert [(h.created_by, h.layer) for h in rows] == [("FROM base", base), ("ENV A=1", None),
                                                        ("RUN make one", one)]
    # an image without (or with inconsistent) history gets a row per layer
    assert [h.layer for h in store.resolve("two:v2").history()] == list(
        store.resolve("two:v2").layers)


def test_sizes_count_shared_layers(store: Store, two_images: tuple[Layer, ...]) -> None:
    base, one, two = two_images
    sizes = {u.image.ref: (u.size, u.shared, u.unique) for u in gc.usage(store)}
    assert sizes == {"one:latest": (base.size + one.size, base.size, one.size),
                     "two:v2": (base.size + two.size, base.size, two.size)}
    store.tag("one", "one:alias")  # the same image under two names shares nothing new
    shared = {u.image.ref: u.shared for u in gc.usage(store)}
    assert shared["one:alias"] == shared["one:latest"] == base.size


def test_tag_and_rm(store: Store, two_images: object) -> None:
    tagged = store.tag("one", "registry.example:5000/team/one:1.0")
    assert tagged.id == store.resolve("one").id
    assert store.remove("one") == "one:latest"
    assert store.resolve("registry.example:5000/team/one:1.0").id == tagged.id
    with pytest.raises(ImageError, match="not found"):
        store.remove("one")
    with pytest.raises(ImageError, match="invalid image name"):
        store.tag("two:v2", "../evil")


def test_prune_removes_only_what_no_tag_reaches(store: Store,
                                                two_images: tuple[Layer, ...]) -> None:
    base, one, two = two_images
    (store.root / "build-cache").mkdir()
    for key, layer in (("k-one", one), ("k-two", two)):
        (store.root / "build-cache" / key).write_text(json.dumps({"digest": layer.digest}))
    assert gc.prune(store).blobs == 0
    store.remove("one")
    report = gc.prune(store)
    assert (report.layers, report.cache_entries, report.in_use) == (1, 1, [])
    assert report.blobs == 3  # one's layer, its config and its manifest
    assert not store.has_blob(one.digest) and not store.has_layer_dir(one.diff_id)
    assert store.has_layer_dir(base.diff_id) and store.has_layer_dir(two.diff_id)
    assert sorted(p.name for p in (store.root / "build-cache").iterdir()) == ["k-two"]
    assert store.resolve("two:v2").layers == (base, two)


def test_prune_keeps_leased_layers(store: Store, two_images: tuple[Layer, ...]) -> None:
    _, one, _ = two_images
    lease = store.lease(store.resolve("one").lower_dirs())
    store.remove("one")
    report = gc.prune(store)
    assert report.in_use == [one.diff_id] and store.has_layer_dir(one.diff_id)
    lease.close()
    assert gc.prune(store).layers == 1 and not store.has_layer_dir(one.diff_id)


def test_lease_of_a_pruned_layer_fails_cleanly(store: Store,
                                               two_images: tuple[Layer, ...]) -> None:
    dirs = store.resolve("one").lower_dirs()
    store.remove("one")
    gc.prune(store)
    with pytest.raises(ImageError, match="was removed from the store"):
        store.lease(dirs)


def test_prune_waits_for_writers(store: Store, two_images: object) -> None:
    store.remove("one")
    waiting = threading.Event()
    done = threading.Event()

    def run_prune() -> None:
        gc.prune(store, on_wait=lambda _msg: waiting.set())
        done.set()

    with store.tempdir() as staging:
        thread = threading.Thread(target=run_prune)
        thread.start()
        assert waiting.wait(30)
        assert not done.is_set() and Path(staging).is_dir()  # a writer's staging survives
    thread.join(30)
    assert done.is_set()
    assert list((store.root / "tmp").iterdir()) == []


WRITER = """
import sys
from pathlib import Path
from sandbox.images.store import Store
from tests.layertools import file, tar_bytes
store, name, count = Store(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3])
shared = Path(sys.argv[1]).parent / "shared.tar"
for i in range(count):
    with store.tempdir() as tmp:
        path = Path(tmp) / "layer.tar"
        path.write_bytes(shared.read_bytes())
        base = store.import_layer_tar(path)
        path.write_bytes(tar_bytes([file(f"{name}-{i}", name.encode())]))
        own = store.import_layer_tar(path)
    store.commit(f"{name}:{i}", [base, own], {})
"""


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (tmp_path / "shared.tar").write_bytes(tar_bytes([file(f"f{i}", bytes(2000)) for i in
                                                     range(50)]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), name, "15"],
                              cwd=REPO, stderr=subprocess.PIPE)
             for name in ("a", "b", "c")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    store = Store(root)
    assert sorted(r for r, _ in store.refs()) == sorted(f"{n}:{i}" for n in "abc"
                                                        for i in range(15))
    layer_dirs = list((root / "layers").iterdir())
    assert len(layer_dirs) == 1 + 45  # the shared layer was unpacked once
    assert list((root / "tmp").iterdir()) == []
    for name in ("a:3", "b:14", "c:0"):
        image = store.resolve(name)
        assert all(Path(d).is_dir() for d in image.lower_dirs())


def test_a_repeated_layer_is_mounted_once_at_its_topmost_place(store: Store) -> None:
    same = add_layer(store, [file("same")])
    other = add_layer(store, [file("other")])
    image = store.commit("twice", [same, other, same], {})
    assert image.lower_dirs() == [str(store.layer_dir(same.diff_id)),
                                  str(store.layer_dir(other.diff_id))]
