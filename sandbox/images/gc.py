"""Disk usage and garbage collection of the image store.

`prune` marks what index.json reaches (manifests, configs, layer blobs, the unpacked layer
of each diff_id, build-cache entries whose layer is kept) and removes the rest. It runs
under the store's gc lock taken exclusively, so it waits until no build, load, unpack or
staging dir is in progress (they hold that lock shared, see `Store.writing`), and it skips
every unpacked layer a live sandbox holds a `Lease` on: a layer in use is never pruned,
even when its image was removed while the job ran (a later prune takes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layers
from .store import Image, Store

_MAX_JSON = 4 << 20


@dataclass(frozen=True, slots=True)
class ImageUsage:
    """Bytes an image takes: ``size`` in all, ``shared`` with another image (distinct
    id) through common layers, ``unique`` to it (freed if it alone were removed)."""

    image: Image
    size: int
    shared: int

    @property
    def unique(self) -> int:
        return self.size - self.shared


def usage(store: Store) -> list[ImageUsage]:
    """Size, shared and unique bytes of every tagged image (layer blob sizes)."""
    images = store.images()
    users: dict[str, set[str]] = {}
    for image in images:
        for layer in image.layers:
            users.setdefault(layer.digest, set()).add(image.id)
    out = []
    for image in images:
        seen: set[str] = set()
        size = shared = 0
        for layer in image.layers:
            if layer.digest in seen:
                continue
            seen.add(layer.digest)
            size += layer.size
            if len(users[layer.digest]) > 1:
                shared += layer.size
        out.append(ImageUsage(image, size, shared))
    return out


@dataclass(slots=True)
class PruneReport:
    """What `prune` removed, and the unreferenced layers it kept because they are in use."""

    blobs: int = 0
    blob_bytes: int = 0
    layers: int = 0
    cache_entries: int = 0
    staging: int = 0
    in_use: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _exclusive(store: Store, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    store.init()
    fd = os.open(store.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait("waiting for running builds and loads to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(store: Store, digest: str) -> dict[str, Any] | None:
    path = store.blob_path(digest)
    try:
        if path.stat().st_size > _MAX_JSON:
            return None
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def reachable(store: Store) -> tuple[set[str], set[str]]:
    """Blob digests and layer diff_ids reached from index.json (nested indexes too)."""
    blobs: set[str] = set()
    diff_ids: set[str] = set()
    pending = [str(m.get("digest", "")) for m in store.read_index()["manifests"]]
    while pending:
        digest = pending.pop()
        if digest in blobs or not store.has_blob(digest):
            continue
        blobs.add(digest)
        doc = _read_json(store, digest) or {}
        for child in doc.get("manifests") or []:  # an image index
            if isinstance(child, dict):
                pending.append(str(child.get("digest", "")))
        cfg = doc.get("config")
        if isinstance(cfg, dict) and store.has_blob(str(cfg.get("digest", ""))):
            blobs.add(str(cfg["digest"]))
            rootfs = (_read_json(store, str(cfg["digest"])) or {}).get("rootfs") or {}
            diff_ids.update(str(d) for d in rootfs.get("diff_ids") or [])
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict):
                blobs.add(str(layer.get("digest", "")))
    return blobs, diff_ids


def _try_remove_layer(store: Store, path: Path) -> bool:
    """Remove an unpacked layer unless a sandbox holds a lease on it (False then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        layers.remove_tree(path)  # not a directory: junk
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        doomed = store.root / "tmp" / f"prune-{path.name}"
        os.rename(path, doomed)  # atomically out of layers/, then deleted at leisure
    finally:
        os.close(fd)
    layers.remove_tree(doomed)
    return True


def prune(store: Store, on_wait: Callable[[str], None] | None = None) -> PruneReport:
    """Remove every blob, unpacked layer and build-cache entry no tag reaches, and stale
    staging dirs. Layers in use by running sandboxes stay (listed in the report)."""
    report = PruneReport()
    with _exclusive(store, on_wait), store.lock():
        blobs, diff_ids = reachable(store)
        blob_dir = store.root / "blobs" / "sha256"
        for entry in list(blob_dir.iterdir()):
            if f"sha256:{entry.name}" in blobs:
                continue
            with contextlib.suppress(FileNotFoundError):
                report.blob_bytes += entry.lstat().st_size
                entry.unlink()
                report.blobs += 1
        cache = store.root / "build-cache"
        if cache.is_dir():
            for entry in list(cache.iterdir()):
                try:
                    kept = json.loads(entry.read_text()).get("digest") in blobs
                except (OSError, ValueError, AttributeError):
                    kept = False
                if not kept:
                    entry.unlink(missing_ok=True)
                    report.cache_entries += 1
        for entry in list((store.root / "layers").iterdir()):
            if f"sha256:{entry.name}" in diff_ids:
                continue
            if _try_remove_layer(store, entry):
                report.layers += 1
            else:
                report.in_use.append(f"sha256:{entry.name}")
        for entry in list((store.root / "tmp").iterdir()):  # no writer holds gc.lock now
            layers.remove_tree(entry)
            report.staging += 1
    return report
