"""``sandbox push NAME [REF]``: an image of the store to a registry, its manifest bytes
unchanged (so the digest printed is the one every other tool sees).

For each blob (config and layers, in parallel): ``HEAD`` (the registry has it: skip), else a
cross-repository mount from a repository of the same registry that is known to hold it
(see `sources`), else an upload: one ``PUT`` up to ``chunk_size``, ``PATCH`` chunks beyond.
A failed upload starts again with a new session (up to ``retries`` times). The manifest goes
last, so the registry never has a tag pointing at missing blobs.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from ..errors import ImageError, RegistryError
from . import reference, registry_config, sources
from .reference import Reference
from .registry import (
    MANIFEST_TYPES,
    MT_OCI_MANIFEST,
    Aborted,
    Client,
    Manifest,
    NullProgress,
    TransferProgress,
    parallel,
    short,
)
from .store import Image, Store


@dataclass(frozen=True, slots=True)
class PushResult:
    ref: Reference
    digest: str
    uploaded: int
    mounted: int
    present: int


def push(name: str, dest: str | None = None, *, store: Store | None = None,
         insecure: bool = False, progress: TransferProgress | None = None,
         cfg: registry_config.RegistriesConfig | None = None) -> PushResult:
    """Push the store's image ``name`` to ``dest`` (default: ``name`` itself)."""
    store = store or Store()
    progress = progress or NullProgress()
    cfg = cfg or registry_config.load()
    image = store.resolve(name)
    ref = reference.parse(dest or name)
    manifest = _manifest(store, image)
    if ref.digest and ref.digest != manifest.digest:
        raise ImageError(f"{name} is {manifest.digest}, not {ref.digest}: push it by tag")
    blobs = [(image.config_digest, len(store.read_blob(image.config_digest)))]
    blobs += [(layer.digest, layer.size) for layer in image.layers]
    mounts = {digest: [r for r in sources.repositories(store, digest, ref.registry)
                       if r != ref.repository] for digest, _ in blobs}
    scopes = [f"repository:{ref.repository}:pull,push"]
    scopes += sorted({f"repository:{r}:pull" for rs in mounts.values() for r in rs})
    with Client(cfg.endpoint(ref.registry, insecure=insecure), cfg, scopes) as client:
        client.ping()
        upload = _Uploads(client, ref, store, progress, mounts)
        upload.run(blobs, cfg.concurrent_downloads)
        client.put_manifest(ref.repository, ref.reference, manifest, what=f"{ref}: manifest")
    sources.record(store, [d for d, _ in blobs], ref)
    return PushResult(ref, manifest.digest, upload.counts["uploaded"],
                      upload.counts["mounted"], upload.counts["present"])


def _manifest(store: Store, image: Image) -> Manifest:
    data = store.read_blob(image.manifest_digest)
    try:
        body = json.loads(data)
        media_type = str(body.get("mediaType") or MT_OCI_MANIFEST)
    except (ValueError, AttributeError):
        raise ImageError(f"{image.ref}: malformed manifest in the store") from None
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"{image.ref}: cannot push a manifest of type {media_type}")
    return Manifest(data, media_type, image.manifest_digest)


class _Uploads:
    def __init__(self, client: Client, ref: Reference, store: Store,
                 progress: TransferProgress, mounts: dict[str, list[str]]) -> None:
        self.client = client
        self.ref = ref
        self.store = store
        self.progress = progress
        self.mounts = mounts
        self.abort = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"uploaded": 0, "mounted": 0, "present": 0}

    def _done(self, digest: str, kind: str, status: str) -> None:
        with self.lock:
            self.counts[kind] += 1
        self.progress.finish(digest, status)

    def blob(self, digest: str, size: int) -> None:
        if self.abort.is_set():
            raise Aborted
        what = f"{self.ref}: blob {short(digest)}"
        repo = self.ref.repository
        if self.client.has_blob(repo, digest, what=what):
            self._done(digest, "present", "Layer already exists")
            return
        path = self.store.blob_path(digest)
        if not path.is_file() or path.stat().st_size != size:
            raise ImageError(f"{self.ref}: blob {digest} is missing or damaged in the store")
        location = ""
        for source in self.mounts.get(digest, []):
            mounted, location = self.client.start_upload(repo, what=what, mount=digest,
                                                         source=source)
            if mounted:
                self._done(digest, "mounted", f"Mounted from {source}")
                return
            break  # the registry opened an ordinary upload instead: use it
        attempts = self.client.cfg.retries
        for attempt in range(attempts):
            if not location:
                _, location = self.client.start_upload(repo, what=what)
            self.progress.start(digest, size, "Uploading")
            try:
                self.client.upload_blob(location, digest, size, path, what=what,
                                        progress=self.progress)
                break
            except RegistryError as e:
                if attempt + 1 >= attempts or self.abort.is_set():
                    raise
                self.progress.message(f"{short(digest)}: upload failed ({e}); starting again")
                self.progress.advance(digest, -size)
                self.client.backoff(attempt, None)
                location = ""
        self._done(digest, "uploaded", "Pushed")

    def run(self, blobs: list[tuple[str, int]], workers: int) -> None:
        parallel(self.blob, list(dict.fromkeys(blobs)), workers, self.abort, "push")
