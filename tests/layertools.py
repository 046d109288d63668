"""Crafting layer tars and image archives for tests, and describing unpacked trees."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from sandbox.images import layers


@dataclass(frozen=True)
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return Entry(info, data)


def directory(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return Entry(info)


def symlink(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return Entry(info)


def hardlink(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return Entry(info)


def device(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, 0o666
    return Entry(info)


def whiteout(path: str) -> Entry:
    """The OCI whiteout hiding ``path`` of lower layers."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}".lstrip("/"))


def opaque(directory_path: str) -> Entry:
    """The OCI marker making ``directory_path`` hide its lower layers' content."""
    return file(f"{directory_path}/.wh..wh..opq".lstrip("/"))


def tar_bytes(entries: list[Entry], compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            tar.addfile(entry.info, io.BytesIO(entry.data) if entry.info.isreg() else None)
    return compress(buf.getvalue(), compression)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MEDIA = {"": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def image_blobs(layer_tars: list[bytes], compression: str = "",
                runtime: dict[str, Any] | None = None,
                history: list[dict[str, Any]] | None = None) -> tuple[bytes, bytes, list[bytes]]:
    """(manifest, config, layer blobs) of an image made of uncompressed ``layer_tars``."""
    blobs = [compress(t, compression) for t in layer_tars]
    cfg: dict[str, Any] = {"architecture": "amd64", "os": "linux",
                           "config": runtime or {"Env": ["PATH=/bin"]},
                           "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layer_tars]}}
    if history is not None:
        cfg["history"] = history
    config = json.dumps(cfg).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA[compression], "digest": sha(b), "size": len(b)}
                   for b in blobs]}).encode()
    return manifest, config, blobs


def oci_archive(layer_tars: list[bytes], name: str | None, compression: str = "",
                annotations: dict[str, str] | None = None) -> bytes:
    """An OCI archive (what `skopeo copy ... oci-archive:` writes) of one image."""
    manifest, config, blobs = image_blobs(layer_tars, compression)
    notes = dict(annotations or {})
    if name is not None:
        notes["org.opencontainers.image.ref.name"] = name
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
         "size": len(manifest), **({"annotations": notes} if notes else {})}]}
    entries = [file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
               file("index.json", json.dumps(index).encode())]
    entries += [file(f"blobs/sha256/{sha(b)[7:]}", b) for b in [manifest, config, *blobs]]
    return tar_bytes(entries)


def docker_archive(layer_tars: list[bytes], tags: list[str], compression: str = "") -> bytes:
    """A docker-archive (what `docker save` writes) of one image."""
    _, config, blobs = image_blobs(layer_tars, compression)
    paths = [f"{sha(t)[7:]}/layer.tar" for t in layer_tars]
    manifest = [{"Config": f"{sha(config)[7:]}.json", "RepoTags": tags, "Layers": paths}]
    entries = [file(f"{sha(config)[7:]}.json", config),
               file("manifest.json", json.dumps(manifest).encode())]
    entries += [file(p, b) for p, b in zip(paths, blobs, strict=True)]
    return tar_bytes(entries)


def describe(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: kind, mode and content / target / opaque flag."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                try:
                    mark = os.getxattr(path, layers.OPAQUE_XATTR, follow_symlinks=False)
                except OSError:
                    mark = b""
                out[rel] = ("dir", mode, mark == b"y")
            elif layers.is_whiteout(st):
                out[rel] = ("whiteout",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, Path(path).read_bytes())
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out
