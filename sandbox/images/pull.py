"""``sandbox pull``: a registry image into the store, with the registry's manifest and config
bytes kept exactly (so digests agree with skopeo, podman and Docker).

1. Resolve the reference on the registry's mirrors in order, then on the registry itself.
2. An index (OCI index or Docker manifest list) is narrowed to this host's platform.
3. The config, then the layers, are fetched in parallel into the store's ``tmp/``, each
   verified against its digest and size while it streams (and resumed after a broken
   connection), moved into ``blobs/`` and unpacked (the unpacker checks each diff_id).
   Blobs already in the store are skipped.
4. Only then are the manifest (and index) blobs written and the name tagged: a failed pull
   leaves no image behind. Verified blobs it already fetched stay (content-addressed; the
   next attempt reuses them).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError, RegistryError
from . import reference, registry_config, sources
from .reference import Reference
from .registry import (
    INDEX_TYPES,
    Aborted,
    Client,
    Manifest,
    NullProgress,
    TransferProgress,
    parallel,
    short,
)
from .store import Image, Store

MAX_CONFIG = 16 << 20
MAX_LAYERS = 1000
LAYER_SUFFIXES = ("tar", "tar+gzip", "tar+zstd", "tar.gzip")
_ARCH = {"x86_64": ("amd64", ""), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7"),
         "armv6l": ("arm", "v6"), "i686": ("386", ""), "ppc64le": ("ppc64le", ""),
         "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}


@dataclass(frozen=True, slots=True)
class PullResult:
    ref: Reference
    name: str             # the store name it was tagged with
    digest: str           # what the registry calls it (the index's digest for an index)
    image: Image
    fetched: int          # blobs downloaded
    present: int          # blobs already in the store


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this host, in OCI terms."""
    arch, variant = _ARCH.get(os.uname().machine, (os.uname().machine, ""))
    return "linux", arch, variant


def _platform_name(p: dict[str, Any]) -> str:
    name = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return f"{name}/{p['variant']}" if p.get("variant") else name


def choose_platform(index: dict[str, Any], what: str) -> dict[str, Any]:
    """The descriptor of this host's platform in an index; a clear error when missing."""
    want_os, want_arch, want_variant = host_platform()
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"{what}: malformed index (no manifests list)")
    offered: list[str] = []
    fallback: dict[str, Any] | None = None
    for desc in entries:
        platform = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(platform, dict):
            continue
        if platform.get("os") != "unknown":
            offered.append(_platform_name(platform))
        if platform.get("os") != want_os or platform.get("architecture") != want_arch:
            continue
        variant = platform.get("variant") or ""
        if variant == want_variant:
            return desc  # type: ignore[no-any-return]
        if not variant or not want_variant:
            fallback = fallback or desc
    if fallback is not None:
        return fallback
    plat = f"{want_os}/{want_arch}" + (f"/{want_variant}" if want_variant else "")
    has = ", ".join(sorted(set(offered))) or "no platforms"
    raise RegistryError(f"{what}: no image for this host's platform {plat} (the index has: "
                        f"{has})")


def _descriptor(value: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(value, dict):
        raise RegistryError(f"{what}: malformed descriptor")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise RegistryError(f"{what}: unsupported or malformed digest {digest!r}")
    try:
        int(digest[7:], 16)
    except ValueError:
        raise RegistryError(f"{what}: malformed digest {digest!r}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what}: malformed size in descriptor of {digest}")
    return digest, size, str(value.get("mediaType", ""))


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt compressed layer raises while it is unpacked."""
    import zstandard  # noqa: PLC0415

    return (EOFError, ValueError, zlib.error, gzip.BadGzipFile, tarfile.TarError,
            zstandard.ZstdError)


def pull(text: str, *, store: Store | None = None, insecure: bool = False,
         progress: TransferProgress | None = None,
         cfg: registry_config.RegistriesConfig | None = None) -> PullResult:
    """Pull ``text`` (``name[:tag]``, ``name@sha256:...``, ``host[:port]/path:tag``) into
    ``store``; raises `RegistryError` (or `ImageError`) with a one-line message."""
    store = store or Store()
    progress = progress or NullProgress()
    cfg = cfg or registry_config.load()
    ref = reference.parse(text)
    try:
        store.init()
        with store.writing():  # prune waits until the pulled image is tagged
            return _pull(ref, store, insecure, progress, cfg)
    except OSError as e:
        if _disk_full(e):
            raise RegistryError(f"pulling {ref}: disk full while writing to {store.root} "
                                f"({e.strerror})") from None
        raise ImageError(f"pulling {ref}: {e.strerror or e} ({e.filename or store.root})"
                         ) from None


def _pull(ref: Reference, store: Store, insecure: bool, progress: TransferProgress,
          cfg: registry_config.RegistriesConfig) -> PullResult:
    what = str(ref)
    client, top = _resolve(ref, cfg, insecure, progress)
    with client:
        manifest = top
        index: Manifest | None = None
        if top.media_type in INDEX_TYPES:
            index = top
            try:
                chosen = choose_platform(top.json(), what)
            except ValueError:
                raise RegistryError(f"{what}: malformed index") from None
            digest, _, _ = _descriptor(chosen, what)
            progress.message(f"{what}: {_platform_name(chosen['platform'])} image {short(digest)}")
            manifest = client.get_manifest(ref.repository, digest, what=what)
            if manifest.media_type in INDEX_TYPES:
                raise RegistryError(f"{what}: an index inside an index is not supported")
        try:
            body = manifest.json()
        except ValueError:
            raise RegistryError(f"{what}: malformed manifest") from None
        cfg_digest, cfg_size, _ = _descriptor(body.get("config"), what)
        layer_descs = body.get("layers")
        if not isinstance(layer_descs, list) or len(layer_descs) > MAX_LAYERS:
            raise RegistryError(f"{what}: malformed manifest (layers)")
        layers = [_descriptor(d, what) for d in layer_descs]
        for digest, _, media_type in layers:
            if not media_type.replace(".diff.", ".").endswith(LAYER_SUFFIXES) \
                    or "foreign" in media_type or "nondistributable" in media_type:
                raise RegistryError(f"{what}: layer {short(digest)} has a media type this tool "
                                    f"does not pull ({media_type or 'none'})")
        if cfg_size > MAX_CONFIG:
            raise RegistryError(f"{what}: config of {cfg_size} bytes is too large: refused")
        with store.tempdir() as tmp:
            transfer = _Transfer(client, ref, store, Path(tmp), progress)
            config = json.loads(transfer.fetch_config(cfg_digest, cfg_size))
            diff_ids = _diff_ids(config, len(layers), what)
            _check_platform(config, progress, what)
            transfer.fetch_layers(list(zip(layers, diff_ids, strict=True)),
                                  cfg.concurrent_downloads)
        for blob in (index, manifest):
            if blob is not None:
                store.put_blob(blob.data, blob.digest)
        sources.record(store, [cfg_digest, *(d for d, _, _ in layers)], ref)
        name = ref.store_name
        store.set_ref(name, manifest.digest, len(manifest.data), media_type=manifest.media_type)
        image = store.resolve(name)
        return PullResult(ref, name, top.digest, image, transfer.fetched, transfer.present)


def _resolve(ref: Reference, cfg: registry_config.RegistriesConfig, insecure: bool,
             progress: TransferProgress) -> tuple[Client, Manifest]:
    """The first endpoint (mirrors first) that serves the manifest, with the manifest."""
    endpoints = cfg.pull_endpoints(ref.registry, insecure=insecure)
    for endpoint in endpoints:
        client = Client(endpoint, cfg, [f"repository:{ref.repository}:pull"])
        try:
            client.ping()
            return client, client.get_manifest(ref.repository, ref.reference, what=str(ref))
        except RegistryError as e:
            client.close()
            if not endpoint.mirror:
                raise
            progress.message(f"mirror {endpoint.host} failed ({e}); trying the next")
    raise AssertionError("unreachable: the registry itself is the last endpoint")


def _diff_ids(config: Any, count: int, what: str) -> list[str]:
    try:
        diff_ids = config["rootfs"]["diff_ids"]
    except (KeyError, TypeError):
        raise RegistryError(f"{what}: the image config has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise RegistryError(f"{what}: the config and the manifest disagree on the number of "
                            f"layers (the manifest has {count})")
    for d in diff_ids:
        _descriptor({"digest": d, "size": 0}, what)
    return [str(d) for d in diff_ids]


def _check_platform(config: dict[str, Any], progress: TransferProgress, what: str) -> None:
    want_os, want_arch, _ = host_platform()
    got = (config.get("os"), config.get("architecture"))
    if got != (want_os, want_arch) and all(got):
        progress.message(f"warning: {what} is a {got[0]}/{got[1]} image; this host is "
                         f"{want_os}/{want_arch}")


class _Transfer:
    """Downloads of one pull: blobs into tmp/, verified, then into the store."""

    def __init__(self, client: Client, ref: Reference, store: Store, tmp: Path,
                 progress: TransferProgress) -> None:
        self.client = client
        self.ref = ref
        self.store = store
        self.tmp = tmp
        self.progress = progress
        self.abort = threading.Event()
        self.lock = threading.Lock()
        self.fetched = 0
        self.present = 0

    def _count(self, fetched: bool) -> None:
        with self.lock:
            if fetched:
                self.fetched += 1
            else:
                self.present += 1

    def download(self, digest: str, size: int) -> None:
        """Fetch one blob into the store (verified), unless it is there already."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                self.progress.start(digest, size, "Downloading")
                self.client.download_blob(self.ref.repository, digest, size, out,
                                          what=f"{self.ref}: blob {short(digest)}",
                                          progress=self.progress, abort=self.abort)
            self.store.put_blob_file(path, digest)
        finally:
            path.unlink(missing_ok=True)
        self._count(True)

    def fetch_config(self, digest: str, size: int) -> bytes:
        if not self.store.has_blob(digest):
            self.download(digest, size)
            self.progress.finish(digest, "Config downloaded")
        else:
            self._count(False)
        data = self.store.read_blob(digest)
        try:
            json.loads(data)
        except ValueError:
            raise RegistryError(f"{self.ref}: the image config is not JSON") from None
        return data

    def layer(self, digest: str, size: int, diff_id: str) -> None:
        if self.store.has_blob(digest):
            self._count(False)
            status = "Already exists"
        else:
            self.download(digest, size)
            status = "Pull complete"
        if self.abort.is_set():
            raise Aborted
        try:
            self.store.unpack_layer(digest, diff_id)
        except _decode_errors() as e:
            raise RegistryError(f"{self.ref}: layer {short(digest)} is not a valid layer "
                                f"archive ({e})") from None
        self.progress.finish(digest, status)

    def fetch_layers(self, layers: list[tuple[tuple[str, int, str], str]], workers: int) -> None:
        jobs = list(dict.fromkeys((digest, size, diff_id)
                                  for (digest, size, _), diff_id in layers))
        parallel(self.layer, jobs, workers, self.abort, "pull")
