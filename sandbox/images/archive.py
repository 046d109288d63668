"""Image archives other tools understand: `save` writes an OCI archive (an OCI image layout
in a tar, what ``skopeo copy ... oci-archive:`` and ``podman save --format oci-archive``
write) or a docker-archive (``manifest.json`` + config + one ``layer.tar`` per layer, what
``docker save`` and ``podman save`` write); `load` reads both, whole or gzip/zstd
compressed, with gzip, zstd or uncompressed layers.

Names: the OCI ref annotation (``org.opencontainers.image.ref.name``) and the containerd
one (``io.containerd.image.name``) carry a full reference, ``localhost/NAME:TAG`` for a
local name, so that podman and skopeo keep it. Loading keeps the full name an archive
gives (podman's ``localhost/app:1`` stays ``localhost/app:1``; `Store.find` finds it as
``app:1`` too), except for an archive we wrote ourselves, whose own annotation
(``sandbox.image.name``; a key of that name in a docker-archive's manifest.json) gives
back the name it was saved under (``py3:latest``). An archive that names no image (only a
tag, or nothing) needs ``tag``.

An archive is untrusted input: member names are only ever looked up, never written to;
blobs enter the store by their verified digest; JSON documents and blobs are bounded;
every layer is unpacked (with the unpacker's checks and its diff_id verified) before any
name points at the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import config
from ..errors import ImageError
from .store import (
    MT_CONFIG,
    MT_DOCKER_LIST,
    MT_INDEX,
    MT_LAYER,
    MT_LAYER_GZIP,
    MT_LAYER_ZSTD,
    MT_MANIFEST,
    REF_ANNOTATION,
    Image,
    Store,
    atomic_file,
    compression_of,
    decompressing_reader,
    normalize_ref,
    oci_arch,
)

FORMATS = ("oci", "docker")
CONTAINERD_NAME = "io.containerd.image.name"
OWN_NAME = "sandbox.image.name"  # the store name we saved an image under
MAX_JSON = 4 << 20
MAX_LAYERS = 1000
MAX_IMAGES = 100
_LAYER_TYPES = {"": MT_LAYER, "gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD}
Progress = Callable[[str], None]


def full_reference(ref: str) -> str:
    """``py3`` -> ``localhost/py3:latest``; a name with a registry host is kept."""
    name = normalize_ref(ref)
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"localhost/{name}"


def local_name(ref: str) -> str:
    """The store's name for a name an archive gives: the name itself, normalised
    (``localhost/app`` -> ``localhost/app:latest``)."""
    return normalize_ref(ref.strip())


# ---------------------------------------------------------------------------- save


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def save(store: Store, ref: str, out: Path, fmt: str = "oci") -> Image:
    """Write the image ``ref`` to ``out`` as an OCI archive or a docker-archive (atomically:
    ``out`` appears complete or not at all)."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown archive format {fmt!r} (expected oci or docker)")
    image = store.resolve(ref)
    out = out.absolute()
    if out.is_dir():
        raise ImageError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise ImageError(f"{out.parent} does not exist")
    try:
        with store.writing(), atomic_file(out) as f, \
                tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if fmt == "oci":
                _save_oci(store, image, tar)
            else:
                _save_docker(store, image, tar)
    except OSError as e:
        raise ImageError(f"cannot write {out}: {e.strerror or e}") from None
    return image


def _save_oci(store: Store, image: Image, tar: tarfile.TarFile) -> None:
    name = full_reference(image.ref)
    index = {"schemaVersion": 2, "mediaType": MT_INDEX,
             "manifests": [{"mediaType": image.manifest_media_type,
                            "digest": image.manifest_digest, "size": image.manifest_size,
                            "annotations": {REF_ANNOTATION: name, CONTAINERD_NAME: name,
                                            OWN_NAME: image.ref}}]}
    _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    _add_bytes(tar, "index.json", json.dumps(index, indent=2).encode())
    _add_dir(tar, "blobs/")
    _add_dir(tar, "blobs/sha256/")
    digests = [image.manifest_digest, image.config_digest]
    digests += [layer.digest for layer in image.layers]
    for digest in dict.fromkeys(digests):
        _add_file(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", store.blob_path(digest))


def _save_docker(store: Store, image: Image, tar: tarfile.TarFile) -> None:
    cfg_name = f"{image.config_digest.removeprefix('sha256:')}.json"
    _add_file(tar, cfg_name, store.blob_path(image.config_digest))
    paths: list[str] = []
    for layer in image.layers:
        path = f"{layer.diff_id.removeprefix('sha256:')}/layer.tar"
        if path not in paths:
            _add_dir(tar, path.split("/")[0] + "/")
            if compression_of(_head(store.blob_path(layer.digest))):
                with store.tempdir() as tmp:  # docker-archive layers are plain tars
                    plain = Path(tmp) / "layer.tar"
                    with open(store.blob_path(layer.digest), "rb") as src, \
                            open(plain, "wb") as dst:
                        shutil.copyfileobj(decompressing_reader(src), dst, 1 << 20)
                    _add_file(tar, path, plain)
            else:
                _add_file(tar, path, store.blob_path(layer.digest))
        paths.append(path)
    manifest = [{"Config": cfg_name, "RepoTags": [full_reference(image.ref)], "Layers": paths,
                 OWN_NAME: image.ref}]  # (docker, podman and skopeo ignore a key they lack)
    _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


# ---------------------------------------------------------------------------- load


class _Archive:
    """Read-only access to the members of an archive by name (symlinks resolved inside)."""

    def __init__(self, tar: tarfile.TarFile, store: Store, bound: int) -> None:
        self.tar = tar
        self.store = store
        self.bound = bound
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            self.members[posixpath.normpath(member.name.lstrip("/"))] = member

    def has(self, name: str) -> bool:
        return posixpath.normpath(name) in self.members

    def _member(self, name: str) -> tarfile.TarInfo:
        key = posixpath.normpath(name.lstrip("/"))
        for _ in range(8):
            member = self.members.get(key)
            if member is None:
                raise ImageError(f"archive: {name!r} is missing")
            if member.isreg():
                return member
            if not member.issym() and not member.islnk():
                raise ImageError(f"archive: {name!r} is not a file")
            base = posixpath.dirname(key) if member.issym() else ""
            key = posixpath.normpath(posixpath.join(base, member.linkname.lstrip("/")))
            if key.startswith("../"):
                raise ImageError(f"archive: {name!r} links outside the archive")
        raise ImageError(f"archive: {name!r}: too many levels of links")

    def read_json(self, name: str) -> Any:
        member = self._member(name)
        if member.size > MAX_JSON:
            raise ImageError(f"archive: {name!r} is too large for a JSON document")
        f = self.tar.extractfile(member)
        assert f is not None
        try:
            return json.loads(f.read())
        except ValueError as e:
            raise ImageError(f"archive: {name!r} is not valid JSON ({e})") from None

    def read_blob(self, name: str, digest: str | None = None) -> tuple[bytes, str]:
        """A small blob (manifest, config): its bytes and digest (checked if given); from
        the store when it already holds that digest."""
        if digest is not None and self.store.has_blob(digest):
            return self.store.read_blob(digest), digest
        member = self._member(name)
        if member.size > MAX_JSON:
            raise ImageError(f"archive: {name!r} is too large")
        f = self.tar.extractfile(member)
        assert f is not None
        data = f.read()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest:
            raise ImageError(f"archive: {name!r} does not match its digest {digest}")
        return data, actual

    def copy_blob(self, name: str, digest: str | None = None) -> tuple[str, int]:
        """Stream a member into the store's blobs (verified): its digest and size."""
        if digest is not None and self.store.has_blob(digest):
            return digest, self.store.blob_path(digest).stat().st_size
        member = self._member(name)
        if member.size > self.bound:
            raise ImageError(f"archive: {name!r} is larger than the bound of {self.bound} "
                             "bytes (SANDBOX_MAX_LAYER_SIZE)")
        f = self.tar.extractfile(member)
        assert f is not None
        fd, tmp = tempfile.mkstemp(dir=self.store.root / "tmp", prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
            return self.store.put_blob_file(Path(tmp), digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def _open(store: Store, path: Path, bound: int) -> Iterator[_Archive]:
    """The archive at ``path``; a gzip or zstd compressed one is decompressed first."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(f)
        source: IO[bytes] = f
        if compression_of(f.read(4)):
            f.seek(0)
            tmp = Path(stack.enter_context(store.tempdir())) / "archive.tar"
            with open(tmp, "wb") as out:
                reader = decompressing_reader(f)
                total = 0
                while chunk := reader.read(1 << 20):
                    total += len(chunk)
                    if total > bound:
                        raise ImageError(f"{path}: decompresses to more than the bound of "
                                         f"{bound} bytes (SANDBOX_MAX_LAYER_SIZE)")
                    out.write(chunk)
            source = stack.enter_context(open(tmp, "rb"))
        else:
            f.seek(0)
        try:
            tar = stack.enter_context(tarfile.open(fileobj=source, mode="r:"))
        except tarfile.TarError as e:
            raise ImageError(f"{path}: not a tar archive ({e})") from None
        yield _Archive(tar, store, bound)


@dataclass(frozen=True, slots=True)
class _Found:
    """One image of an archive: its manifest (bytes, digest, media type) and names."""

    manifest: bytes
    digest: str
    media_type: str
    names: tuple[str, ...]


def load(store: Store, path: Path, tag: str | None = None,
         progress: Progress | None = None) -> list[Image]:
    """Load every image of the archive at ``path`` into the store; returns them."""
    log = progress or (lambda _line: None)
    store.init()
    try:
        with store.writing(), _open(store, path, config.max_layer_bytes()) as archive:
            if archive.has("index.json"):
                found = _oci_images(archive)
            elif archive.has("manifest.json"):
                found = _docker_images(archive)
            else:
                raise ImageError(f"{path}: neither an OCI archive (index.json) nor a "
                                 "docker-archive (manifest.json)")
            if tag is not None:
                if len(found) != 1:
                    raise ImageError(f"{path} holds {len(found)} images: --tag needs exactly "
                                     "one")
                found = [_Found(found[0].manifest, found[0].digest, found[0].media_type,
                                (tag,))]
            images = []
            for item in found:
                if not item.names:
                    raise ImageError(f"{path}: image {item.digest[:19]} has no name; give "
                                     "one with --tag")
                images += _store_image(store, archive, item, log)
    except tarfile.TarError as e:
        raise ImageError(f"{path}: damaged archive ({e})") from None
    return images


def _store_image(store: Store, archive: _Archive, item: _Found, log: Progress) -> list[Image]:
    """Copy an image's blobs in, unpack (and so verify) its layers, then name it."""
    try:
        manifest = json.loads(item.manifest)
        cfg_digest = str(manifest["config"]["digest"])
        descs = manifest["layers"]
        if not isinstance(descs, list) or len(descs) > MAX_LAYERS:
            raise ImageError("archive: bad layer list")
        cfg_bytes, _ = archive.read_blob(_blob_name(cfg_digest), cfg_digest)
        diff_ids = json.loads(cfg_bytes)["rootfs"]["diff_ids"]
        if len(diff_ids) != len(descs):
            raise ImageError(f"archive: image {item.digest[:19]}: config and manifest disagree "
                             "on the number of layers")
        for desc, diff_id in zip(descs, diff_ids, strict=True):
            digest = str(desc["digest"])
            log(f"Loading layer {digest[7:19]}")
            archive.copy_blob(_blob_name(digest), digest)
            store.unpack_layer(digest, str(diff_id))
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"archive: malformed manifest or config ({e})") from None
    store.put_blob(cfg_bytes, cfg_digest)
    store.put_blob(item.manifest, item.digest)
    out = []
    for name in item.names:
        ref = local_name(name)
        store.set_ref(ref, item.digest, len(item.manifest), media_type=item.media_type)
        out.append(store.resolve(ref))
    return out


def _blob_name(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise ImageError(f"archive: unsupported digest {digest!r}")
    return f"blobs/sha256/{value}"


def _oci_images(archive: _Archive) -> list[_Found]:
    index = archive.read_json("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError("archive: index.json has no manifest list")
    repo_tags: list[list[str]] = []
    if archive.has("manifest.json"):  # docker >= 25 writes both; its names are here
        docker = archive.read_json("manifest.json")
        if isinstance(docker, list):
            repo_tags = [list(e.get("RepoTags") or []) for e in docker if isinstance(e, dict)]
    out = []
    for position, desc in enumerate(index["manifests"][:MAX_IMAGES]):
        if not isinstance(desc, dict):
            continue
        annotations = desc.get("annotations") or {}
        names = [str(annotations.get(OWN_NAME) or annotations.get(CONTAINERD_NAME) or "")]
        ref_name = str(annotations.get(REF_ANNOTATION) or "")
        if not names[0] and (":" in ref_name or "/" in ref_name):
            names = [ref_name]
        if not names[0]:
            names = repo_tags[position] if position < len(repo_tags) else []
        manifest, digest, media_type = _pick_manifest(archive, desc)
        out.append(_Found(manifest, digest, media_type, tuple(n for n in names if n)))
    return out


def _pick_manifest(archive: _Archive, desc: dict[str, Any]) -> tuple[bytes, str, str]:
    """An image manifest for this machine, following image indexes (multi-platform)."""
    for _ in range(4):
        digest = str(desc.get("digest", ""))
        data, _ = archive.read_blob(_blob_name(digest), digest)
        try:
            doc = json.loads(data)
        except ValueError:
            raise ImageError(f"archive: manifest {digest[:19]} is not valid JSON") from None
        media_type = str(doc.get("mediaType") or desc.get("mediaType") or MT_MANIFEST)
        if media_type not in (MT_INDEX, MT_DOCKER_LIST) and "manifests" not in doc:
            return data, digest, media_type
        children = [c for c in doc.get("manifests") or [] if isinstance(c, dict)]
        arch = oci_arch()
        matching = [c for c in children
                    if (c.get("platform") or {}).get("architecture") == arch
                    and (c.get("platform") or {}).get("os", "linux") == "linux"]
        if not (matching or children):
            raise ImageError(f"archive: index {digest[:19]} lists no manifest")
        desc = (matching or children)[0]
    raise ImageError("archive: image indexes nested too deeply")


def _docker_images(archive: _Archive) -> list[_Found]:
    entries = archive.read_json("manifest.json")
    if not isinstance(entries, list):
        raise ImageError("archive: manifest.json is not a list")
    out = []
    for entry in entries[:MAX_IMAGES]:
        try:
            cfg_bytes, cfg_digest = archive.read_blob(str(entry["Config"]))
            paths = [str(p) for p in entry["Layers"]]
            names = tuple(str(t) for t in entry.get("RepoTags") or [])
            if isinstance(entry.get(OWN_NAME), str):
                names = (entry[OWN_NAME],)
        except (KeyError, TypeError) as e:
            raise ImageError(f"archive: malformed manifest.json entry ({e})") from None
        if len(paths) > MAX_LAYERS:
            raise ImageError("archive: too many layers")
        layers = []
        for layer_path in paths:
            digest, size = archive.copy_blob(layer_path)
            head = _head(archive.store.blob_path(digest))
            layers.append({"mediaType": _LAYER_TYPES[compression_of(head)], "digest": digest,
                           "size": size})
        archive.store.put_blob(cfg_bytes, cfg_digest)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": {"mediaType": MT_CONFIG, "digest": cfg_digest,
                               "size": len(cfg_bytes)},
                    "layers": layers}
        data = json.dumps(manifest, indent=2).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        out.append(_Found(data, digest, MT_MANIFEST, names))
    return out
