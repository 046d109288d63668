"""Where each blob is known to live on registries, so that a push can ask the registry to
mount it from another repository instead of uploading it again.

``$SANDBOX_HOME/blob-sources/HEX`` holds one ``registry/repository`` per line, newest last,
appended after every pull and push (a hint only: a wrong one costs one refused mount).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .reference import Reference
from .store import Store

KEEP = 8


def _path(store: Store, digest: str) -> str:
    return str(store.root / "blob-sources" / digest.removeprefix("sha256:"))


def record(store: Store, digests: Iterable[str], ref: Reference) -> None:
    """Remember that ``ref``'s repository holds ``digests``."""
    (store.root / "blob-sources").mkdir(exist_ok=True)
    line = f"{ref.name}\n".encode()
    for digest in set(digests):
        store.blob_path(digest)  # validates the digest
        path = _path(store, digest)
        if ref.name in _read(path):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def repositories(store: Store, digest: str, registry: str) -> list[str]:
    """Repositories on ``registry`` known to hold ``digest``, most recent first."""
    store.blob_path(digest)
    out = []
    for name in reversed(_read(_path(store, digest))):
        host, _, repository = name.partition("/")
        if host == registry and repository and repository not in out:
            out.append(repository)
    return out[:KEEP]
