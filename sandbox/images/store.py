"""The image store: an OCI image layout under ``$SANDBOX_HOME``, plus unpacked layers.

```
$SANDBOX_HOME/
  oci-layout, index.json     an OCI image layout (skopeo/podman can read it: oci:DIR:REF);
                             each manifest is tagged with org.opencontainers.image.ref.name
  blobs/sha256/HEX           layer tars, configs, manifests, verified on write
  layers/HEX/                each layer unpacked once (HEX = its diff_id), shared read-only
                             by every sandbox that uses it (an overlayfs lowerdir); layers/
                             itself is private (0700) to the store's owner
  tmp/                       staging on the same filesystem, for atomic renames
  build-cache/KEY            which layer a build step produced (see build.py)
  lock                       flock(2) guarding index.json updates
  gc.lock                    flock(2): shared by every writer (build, load, unpack, staging),
                             exclusive for `prune` (see gc.py)
```

Writers stage in ``tmp/`` and rename into place, so no half-written blob or layer is ever
visible; index.json is replaced atomically under the lock. A sandbox holds a shared flock
on each layer directory it mounts (a `Lease`) for as long as it lives; prune removes a
layer only when it can take that lock exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import config
from ..errors import ImageError, UnsafeLayerError
from . import layers
from .reference import lookup_names

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_REF_RE = re.compile(r"^[a-zA-Z0-9\[][a-zA-Z0-9._/:@+\[\]-]*$")


def normalize_ref(ref: str) -> str:
    """``py3`` -> ``py3:latest``; references with a tag or digest are kept."""
    ref = ref.strip()
    if not _REF_RE.match(ref) or ".." in ref:
        raise ImageError(f"invalid image name {ref!r}")
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def _hex(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or not _HEX_RE.match(value):
        raise ImageError(f"invalid digest {digest!r}")
    return value


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str      # of the blob (what the manifest names)
    diff_id: str     # of the uncompressed tar (what the config names; keys layers/)
    size: int
    media_type: str = MT_LAYER


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of `sandbox image history`: an instruction and the layer it made (if any)."""

    created: str
    created_by: str
    layer: Layer | None
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Image:
    ref: str
    manifest_digest: str
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    store_root: Path
    manifest_size: int = 0
    manifest_media_type: str = MT_MANIFEST

    @property
    def id(self) -> str:
        return self.config_digest

    @property
    def runtime(self) -> dict[str, Any]:
        """The ``config`` object of the OCI config (Env, Entrypoint, Cmd, WorkingDir...)."""
        value = self.config.get("config") or {}
        return value if isinstance(value, dict) else {}

    @property
    def entrypoint(self) -> list[str]:
        return list(self.runtime.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.runtime.get("Cmd") or [])

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.runtime.get("Env") or []:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out

    @property
    def workdir(self) -> str:
        return str(self.runtime.get("WorkingDir") or "")

    def lower_dirs(self) -> list[str]:
        """Unpacked layer dirs for overlayfs ``lowerdir``: topmost layer first. A layer that
        appears twice (two steps that changed the same things the same way) is listed once,
        at its topmost place: overlayfs refuses a repeated lowerdir, and the lower copy
        cannot show anything the upper one does not shadow."""
        dirs = [str(self.store_root / "layers" / _hex(layer.diff_id))
                for layer in reversed(self.layers)]
        return list(dict.fromkeys(dirs))

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def created(self) -> str:
        return str(self.config.get("created", ""))

    def history(self) -> list[HistoryEntry]:
        """The config's history, each non-empty entry paired with its layer in order (as
        `docker history` does); an image without usable history gets one row per layer."""
        raw = self.config.get("history")
        entries = [h for h in raw if isinstance(h, dict)] if isinstance(raw, list) else []
        if sum(1 for h in entries if not h.get("empty_layer")) != len(self.layers):
            return [HistoryEntry("", "", layer) for layer in self.layers]
        out: list[HistoryEntry] = []
        remaining = iter(self.layers)
        for h in entries:
            layer = None if h.get("empty_layer") else next(remaining)
            out.append(HistoryEntry(str(h.get("created", "")), str(h.get("created_by", "")),
                                    layer, str(h.get("comment", ""))))
        return out


class Lease:
    """Shared flocks on the layer directories a sandbox mounts; `close` releases them.
    `gc.prune` never removes a layer directory someone holds a lease on."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class Store:
    """An image store rooted at ``root`` (default: `config.sandbox_home`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or config.sandbox_home()).absolute()

    # -- layout ---------------------------------------------------------------------------

    def init(self) -> None:
        for sub in ("blobs/sha256", "layers", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Unpacked layers keep the modes of the image's files (setuid bits are dropped on
        # unpack): only the store's owner may reach them; sandboxes mount them as that owner.
        layers_dir = self.root / "layers"
        if layers_dir.stat().st_mode & 0o077:
            layers_dir.chmod(0o700)
        layout = self.root / "oci-layout"
        if not layout.exists():
            self._atomic_write(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        if not (self.root / "index.json").exists():
            with self.lock():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2,
                                       "mediaType": "application/vnd.oci.image.index.v1+json",
                                       "manifests": []})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on index.json (held briefly, around a read-modify-write)."""
        with self._flock("lock", fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) while this process adds content that no tag reaches yet: a build,
        a load, an unpack, a staging dir. `gc.prune` waits for every writer to finish."""
        with self._flock("gc.lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        with atomic_file(path) as f:
            f.write(data)

    def read_index(self) -> dict[str, Any]:
        """index.json as it is now (``{"manifests": []}`` for a new store)."""
        return self._read_index()

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        except (OSError, ValueError) as e:
            raise ImageError(f"image store index {self.root / 'index.json'} is unreadable: "
                             f"{e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("manifests"), list):
            raise ImageError(f"image store index {self.root / 'index.json'} is malformed")
        return data

    def _write_index(self, index: dict[str, Any]) -> None:
        self._atomic_write(self.root / "index.json", json.dumps(index, indent=2).encode())

    # -- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is missing from the store") from None

    def put_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data``; if ``digest`` is given it must match. Returns the digest."""
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != actual:
            raise ImageError(f"digest mismatch: expected {digest}, got {actual}")
        path = self.blob_path(actual)
        if not path.exists():
            self.init()
            self._atomic_write(path, data)
        return actual

    def put_blob_file(self, src: Path, digest: str | None = None) -> tuple[str, int]:
        """Move a staged file (in this store's tmp/) into blobs/, verifying its digest."""
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        actual = "sha256:" + h.hexdigest()
        if digest is not None and digest != actual:
            src.unlink(missing_ok=True)
            raise ImageError(f"digest mismatch: expected {digest}, got {actual}")
        os.chmod(src, 0o644)
        os.replace(src, self.blob_path(actual))
        return actual, size

    @contextlib.contextmanager
    def tempdir(self) -> Iterator[str]:
        """A staging directory in ``tmp/`` (same filesystem as blobs/ and layers/), removed
        afterwards; `writing` is held meanwhile, so prune never sweeps it."""
        with self.writing():
            self.init()
            path = tempfile.mkdtemp(dir=self.root / "tmp", prefix="stage-")
            try:
                yield path
            finally:
                layers.remove_tree(Path(path))

    # -- layers ---------------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / _hex(diff_id)

    def has_layer_dir(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    def unpack_layer(self, blob_digest: str, diff_id: str) -> Path:
        """Unpack a stored layer blob into layers/DIFFID (once; atomically), checking that
        its uncompressed content hashes to ``diff_id``."""
        target = self.layer_dir(diff_id)
        if target.is_dir():
            return target
        with self.writing():
            return self._unpack_layer(blob_digest, diff_id, target)

    def _unpack_layer(self, blob_digest: str, diff_id: str, target: Path) -> Path:
        self.init()
        staging = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="layer-"))
        bound = config.max_layer_bytes()
        try:
            os.chmod(staging, 0o755)  # noqa: S103 - layers are shared read-only
            try:
                f = open(self.blob_path(blob_digest), "rb")  # noqa: SIM115
            except FileNotFoundError:
                raise ImageError(f"layer {blob_digest} is missing from the store") from None
            with f:
                hashing = HashingReader(f, limit=bound)
                layers.unpack(hashing, staging, max_bytes=bound)  # type: ignore[arg-type]
                hashing.drain()
            if diff_id != blob_digest and hashing.uncompressed_digest() != diff_id:
                raise ImageError(f"layer {blob_digest}: uncompressed content does not match "
                                 f"its diff_id {diff_id}")
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                layers.remove_tree(staging)  # someone else unpacked it first
        except BaseException:
            layers.remove_tree(staging)
            raise
        return target

    def lease(self, layer_dirs: Iterable[str]) -> Lease:
        """Take a shared flock on each unpacked layer dir (they must exist): held by a
        sandbox for its whole life so that `gc.prune` never removes a layer in use."""
        fds: list[int] = []
        with self.writing():  # prune holds this exclusively while it sweeps
            try:
                for path in layer_dirs:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                     | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise ImageError(f"layer {Path(path).name[:12]} was removed from "
                                         "the store (image removed and pruned?)") from None
                    fds.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        return Lease(fds)

    def import_layer_tar(self, tar_path: Path) -> Layer:
        """Adopt an uncompressed layer tar (moved from this store's tmp/) and unpack it."""
        digest, size = self.put_blob_file(tar_path)
        self.unpack_layer(digest, digest)
        return Layer(digest=digest, diff_id=digest, size=size, media_type=MT_LAYER)

    # -- images ---------------------------------------------------------------------------

    def commit(self, ref: str, image_layers: list[Layer], image_config: dict[str, Any],
               annotations: dict[str, str] | None = None) -> Image:
        """Write config and manifest blobs and point ``ref`` at them."""
        ref = normalize_ref(ref)
        with self.writing():
            return self._commit(ref, image_layers, image_config, annotations)

    def _commit(self, ref: str, image_layers: list[Layer], image_config: dict[str, Any],
                annotations: dict[str, str] | None) -> Image:
        cfg = dict(image_config)
        cfg.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        cfg.setdefault("architecture", oci_arch())
        cfg.setdefault("os", "linux")
        cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in image_layers]}
        cfg_bytes = json.dumps(cfg, indent=2, sort_keys=True).encode()
        cfg_digest = self.put_blob(cfg_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                        "size": layer.size} for layer in image_layers],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        man_bytes = json.dumps(manifest, indent=2).encode()
        man_digest = self.put_blob(man_bytes)
        self.set_ref(ref, man_digest, len(man_bytes))
        return self.resolve(ref)

    def set_ref(self, ref: str, manifest_digest: str, size: int, *,
                media_type: str = MT_MANIFEST) -> None:
        """Point ``ref`` at a stored manifest (replacing what it pointed at)."""
        ref = normalize_ref(ref)
        if not self.has_blob(manifest_digest):
            raise ImageError(f"manifest {manifest_digest} is missing from the store")
        with self.lock():
            index = self._read_index()
            entries = [m for m in index["manifests"]
                       if (m.get("annotations") or {}).get(REF_ANNOTATION) != ref]
            entries.append({"mediaType": media_type, "digest": manifest_digest, "size": size,
                            "annotations": {REF_ANNOTATION: ref}})
            index["manifests"] = entries
            self._write_index(index)

    def tag(self, source: str, target: str) -> Image:
        """Give the image ``source`` names the additional name ``target``."""
        image = self.resolve(source)
        self.set_ref(target, image.manifest_digest, image.manifest_size,
                     media_type=image.manifest_media_type)
        return self.resolve(target)

    def refs(self) -> list[tuple[str, str]]:
        """``(ref, manifest digest)`` of every tagged image."""
        out = []
        for m in self._read_index()["manifests"]:
            ref = (m.get("annotations") or {}).get(REF_ANNOTATION)
            if ref:
                out.append((ref, m["digest"]))
        return out

    def find(self, ref: str) -> Image | None:
        """The image named ``ref`` (a local name first, then its full registry form: see
        `reference.lookup_names`), or an image id prefix."""
        refs = self.refs()
        for wanted in _candidates(ref):
            for name, digest in refs:
                if name == wanted:
                    return self._load(name, digest)
        if re.match(r"^(sha256:)?[0-9a-f]{6,64}$", ref):  # an image id (config digest) prefix
            value = ref.removeprefix("sha256:")
            for name, digest in self.refs():
                image = self._load(name, digest)
                if image.config_digest.removeprefix("sha256:").startswith(value):
                    return image
        return None

    def resolve(self, ref: str) -> Image:
        image = self.find(ref)
        if image is None:
            raise ImageError(f"image {ref!r} not found (see `sandbox images`)")
        return image

    def _load(self, ref: str, manifest_digest: str) -> Image:
        try:
            raw = self.read_blob(manifest_digest)
            manifest = json.loads(raw)
            cfg_digest = manifest["config"]["digest"]
            cfg = json.loads(self.read_blob(cfg_digest))
            diff_ids = cfg["rootfs"]["diff_ids"]
            descs = manifest["layers"]
            if len(diff_ids) != len(descs):
                raise ImageError(f"image {ref}: config and manifest disagree on layers")
            image_layers = tuple(Layer(digest=d["digest"], diff_id=diff, size=int(d["size"]),
                                       media_type=d.get("mediaType", MT_LAYER))
                                 for d, diff in zip(descs, diff_ids, strict=True))
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"image {ref}: malformed manifest or config ({e})") from None
        return Image(ref=ref, manifest_digest=manifest_digest, config_digest=cfg_digest,
                     config=cfg, layers=image_layers, store_root=self.root,
                     manifest_size=len(raw),
                     manifest_media_type=str(manifest.get("mediaType") or MT_MANIFEST))

    def ensure_unpacked(self, image: Image) -> None:
        """Unpack every layer of ``image`` that is not unpacked yet."""
        for layer in image.layers:
            if not self.has_layer_dir(layer.diff_id):
                if not self.has_blob(layer.digest):
                    raise ImageError(f"image {image.ref}: layer {layer.digest} is missing")
                self.unpack_layer(layer.digest, layer.diff_id)

    def images(self) -> list[Image]:
        return [self._load(name, digest) for name, digest in self.refs()]

    def remove(self, ref: str) -> str:
        """Untag ``ref``; returns the normalised name. Blobs stay until `prune`."""
        with self.lock():
            index = self._read_index()
            for wanted in _candidates(ref):
                kept = [m for m in index["manifests"]
                        if (m.get("annotations") or {}).get(REF_ANNOTATION) != wanted]
                if len(kept) != len(index["manifests"]):
                    index["manifests"] = kept
                    self._write_index(index)
                    return wanted
        raise ImageError(f"image {ref!r} not found")


def _candidates(ref: str) -> list[str]:
    """Store names ``ref`` may mean: as given, then ``localhost/REF`` (a name podman gave
    a local image), then its full registry form."""
    out: list[str] = []
    given = normalize_ref(ref)
    local = [] if "/" in given.split("@")[0] else [f"localhost/{given}"]
    for name in [*lookup_names(given)[:1], *local, *lookup_names(given)[1:]]:
        if normalize_ref(name) not in out:
            out.append(normalize_ref(name))
    return out


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file beside it, renamed into place (mode 0644)
    only once the block succeeds: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def oci_arch() -> str:
    """This machine's architecture as OCI names it (amd64, arm64...)."""
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``""`` (none) from a stream's first bytes."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    return ""


def decompressing_reader(f: IO[bytes]) -> IO[bytes]:
    """``f`` itself, or a reader of its gzip or zstd content (sniffed from its magic;
    ``f`` must be seekable)."""
    head = f.read(4)
    f.seek(-len(head), os.SEEK_CUR)
    kind = compression_of(head)
    if kind == "gzip":
        import gzip  # noqa: PLC0415

        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if kind == "zstd":
        import zstandard  # noqa: PLC0415

        return zstandard.ZstdDecompressor().stream_reader(f)
    return f


class HashingReader:
    """Wraps a (possibly compressed) blob; hashes the uncompressed bytes its reader
    consumes and refuses to produce more than ``limit`` of them (decompression bombs)."""

    def __init__(self, f: IO[bytes], limit: int | None = None) -> None:
        self._raw = decompressing_reader(f)
        self._h = hashlib.sha256()
        self._limit = limit
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.count += len(data)
        if self._limit is not None and self.count > self._limit + (1 << 20):
            raise UnsafeLayerError(f"layer is larger than the bound of {self._limit} bytes "
                                   "(SANDBOX_MAX_LAYER_SIZE)")
        self._h.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def uncompressed_digest(self) -> str:
        return "sha256:" + self._h.hexdigest()
