"""Layer tars <-> directories, safely, with OCI whiteouts <-> overlayfs whiteouts.

Unpacking never writes outside its target: absolute names and ``..`` are refused, so are
entries below a symlinked parent, hard links that point outside, and archives larger than
a bound. Device nodes are dropped (the sandbox bind-mounts its own /dev); setuid and setgid
bits are dropped (sandboxes mount everything nosuid anyway, and an unpacked layer must not
hand out a setuid file on the host); ownership is not restored (every file belongs to the
user who unpacks, which a single-id user namespace maps to the job's ids). ``.wh.NAME``
becomes an overlay whiteout (a 0:0 character device, which the kernel lets anyone create)
and ``.wh..wh..opq`` becomes the ``user.overlay.opaque`` xattr, which overlayfs honours
when mounted with ``userxattr`` in a user namespace. As the OCI spec says, a whiteout only
hides lower layers: an entry of the same layer with that name wins.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ImageError, UnsafeLayerError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"
DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_MAX_ENTRIES = 1_000_000
# Our own checks run first (see _Unpacker.filter); Python >= 3.12 (and 3.14's default)
# would otherwise apply the "data" filter, which strips setuid bits and refuses absolute
# symlinks that every root filesystem has.
_TRUSTED: dict[str, Any] = ({"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter")
                            else {})


class _NoChownTarFile(tarfile.TarFile):
    """Never restore ownership: files belong to whoever unpacks (see the module doc)."""

    def chown(self, tarinfo: tarfile.TarInfo, targetpath: Any, numeric_owner: bool) -> None:
        return None


def _with(member: tarfile.TarInfo, **changes: Any) -> tarfile.TarInfo:
    """A copy of ``member`` with some attributes changed (TarInfo.replace is 3.12+)."""
    out = copy.copy(member)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def _clean_name(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise UnsafeLayerError(f"layer entry {name!r} points outside the layer")
    return "/".join(parts)


def _check_parents(root: str, rel: str) -> None:
    """Refuse an entry whose parent (inside the target) is a symlink or not a directory."""
    path = root
    for part in rel.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeLayerError(f"layer entry {rel!r} lies below a symlink ({part!r})")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(f"layer entry {rel!r} lies below a non-directory")


class _Unpacker:
    def __init__(self, root: str, max_bytes: int, max_entries: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.total = 0
        self.entries = 0
        self.whiteouts: list[str] = []
        self.opaque: list[str] = []
        self.dir_modes: list[tuple[str, int]] = []

    def filter(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise UnsafeLayerError(f"layer has more than {self.max_entries} entries")
        rel = _clean_name(member.name)
        if not rel:
            return None  # the root itself
        _check_parents(self.root, rel)
        base = rel.rsplit("/", 1)[-1]
        parent = rel[: -len(base)].rstrip("/")
        if base == OPAQUE_MARKER:
            self.opaque.append(parent)
            return None
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteouts.append(f"{parent}/{base[len(WHITEOUT_PREFIX):]}".lstrip("/"))
            return None
        if member.ischr() or member.isblk():
            return None  # devices never come from an image; 0:0 (a whiteout) is handled above
        if member.islnk():
            link = _clean_name(member.linkname)
            if link == rel:
                raise UnsafeLayerError(f"hard link {rel!r} points to itself")
            _check_parents(self.root, link)
            target = os.path.join(self.root, link)
            if not os.path.isfile(target) or os.path.islink(target):
                raise UnsafeLayerError(f"hard link {rel!r} -> {member.linkname!r} is not to a "
                                       "regular file of this layer")
            member = _with(member, name=rel, linkname=link)
        elif member.issym() or member.isreg() or member.isdir() or member.isfifo():
            member = _with(member, name=rel)
        else:
            return None
        if member.mode & (stat.S_ISUID | stat.S_ISGID):
            member = _with(member, mode=member.mode & ~(stat.S_ISUID | stat.S_ISGID))
        self.total += max(member.size, 0) if member.isreg() else 0
        if self.total > self.max_bytes:
            raise UnsafeLayerError(f"layer unpacks to more than {self.max_bytes} bytes")
        if member.isdir():  # keep directories traversable and writable while we unpack
            self.dir_modes.append((rel, member.mode & 0o7777))
            member = _with(member, mode=member.mode | 0o700)
        # Replace an existing entry (tars may repeat a name; the last one wins).
        path = os.path.join(self.root, rel)
        if os.path.lexists(path) and not (member.isdir() and os.path.isdir(path)
                                          and not os.path.islink(path)):
            _remove(path)
        return member


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        remove_tree(Path(path))
    else:
        os.unlink(path)


def unpack(fileobj: IO[bytes], target: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
           max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
    """Unpack a layer tar (plain, or gzip/xz/bz2 by magic) into the empty dir ``target``."""
    root = str(target)
    unpacker = _Unpacker(root, max_bytes, max_entries)
    try:
        with _NoChownTarFile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                checked = unpacker.filter(member, root)
                if checked is not None:
                    tar.extract(checked, root, **_TRUSTED)
        _finish(root, unpacker)
    except (tarfile.TarError, ValueError, KeyError) as e:  # tarfile's own, on odd input
        raise UnsafeLayerError(f"malformed layer archive: {e}") from None
    except (OSError, EOFError) as e:  # e.g. a name too long, a full disk, a truncated stream
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ImageError(f"cannot unpack layer: {detail}") from None


def _finish(root: str, unpacker: _Unpacker) -> None:
    """Whiteouts, opaque markers and directory modes, once every entry is in place (so the
    tar's order does not matter). A later entry may have replaced a directory by a symlink:
    nothing here goes through one."""
    for rel in unpacker.whiteouts:
        _check_parents(root, rel)
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):  # an entry of this very layer wins over its whiteout
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    for rel in unpacker.opaque:
        if rel:
            _check_parents(root, f"{rel}/{OPAQUE_MARKER}")
            os.makedirs(os.path.join(root, rel), exist_ok=True)
        if (real := _real_dir(root, rel)) is not None:
            os.setxattr(real, OPAQUE_XATTR, b"y", follow_symlinks=False)
    for rel, mode in reversed(unpacker.dir_modes):
        if (real := _real_dir(root, rel)) is not None:  # else replaced by a later entry
            os.chmod(real, mode & ~(stat.S_ISUID | stat.S_ISGID))


def _real_dir(root: str, rel: str) -> str | None:
    """``root/rel`` if it and every directory on the way are real directories (no symlink),
    else None."""
    path = root
    for part in rel.split("/") if rel else ():
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a 0:0 character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def merged_lookup(lower: list[str], rel: str) -> str | None:
    """Where ``rel`` lives in the overlay of the unpacked ``lower`` dirs (topmost first),
    honouring whiteouts and opaque dirs; None when it is absent or lies below a symlink or
    a non-directory (never followed). The result may be a symlink itself."""
    parts = [p for p in rel.split("/") if p and p != "."]
    for layer in lower:
        path = layer
        for index, part in enumerate(parts):
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if _getxattr(os.path.dirname(path), OPAQUE_XATTR) == b"y":
                    return None  # an opaque dir of this layer hides the lower ones
                break
            if is_whiteout(st):
                return None
            if index == len(parts) - 1:
                return path
            if not stat.S_ISDIR(st.st_mode):
                return None
        else:
            return None
    return None


def resolve_in_image(lower: list[str], path: str) -> tuple[str, bool] | None:
    """Where the image path ``path`` leads in the overlay of ``lower``, following the
    image's symlinks as the kernel would inside the sandbox (relative to the image's root:
    never to anything of the host's): ``(host path, is a directory)``, or None when it
    does not exist (or loops)."""
    todo = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        found = merged_lookup(lower, "/".join([*done, part]))
        if found is None:
            return None
        if os.path.islink(found):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(found)
            todo = [p for p in target.split("/") if p and p != "."] + todo
            if target.startswith("/"):
                done = []
            continue
        done.append(part)
        if todo and not os.path.isdir(found):
            return None
    if not done:
        return (lower[0], True) if lower else None
    found = merged_lookup(lower, "/".join(done))
    return None if found is None else (found, os.path.isdir(found))


def read_merged(lower: list[str], rel: str, max_bytes: int = 1 << 20) -> str:
    """The text of the regular file ``rel`` in the overlay of ``lower`` ("" when it is
    missing, not a regular file, a symlink, or larger than ``max_bytes``)."""
    found = merged_lookup(lower, rel)
    if found is None:
        return ""
    try:
        fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return ""
        return f.read(max_bytes).decode("utf-8", errors="replace")


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` (relative path, lstat), parents first, sorted."""
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(path), reverse=True)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            st = os.lstat(os.path.join(root, child))
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def pack(source: Path, out: IO[bytes]) -> str:
    """Write the directory ``source`` (an overlay upper) as an OCI layer tar to ``out``,
    turning overlay whiteouts and opaque dirs into their OCI forms. Entries are sorted and
    owned by 0:0 so that the same tree gives the same digest. Returns the diff_id."""
    hasher = _HashingWriter(out)
    root = str(source)
    with tarfile.open(fileobj=hasher, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, st in sorted(_walk(root)):
            path = os.path.join(root, rel)
            if is_whiteout(st):
                parent, _, base = rel.rpartition("/")
                info = tarfile.TarInfo(f"{parent}/{WHITEOUT_PREFIX}{base}".lstrip("/"))
                info.mtime = 0
                tar.addfile(info, io.BytesIO(b""))
                continue
            info = tar.gettarinfo(path, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.ischr() or info.isblk():
                continue
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if info.isdir() and _getxattr(path, OPAQUE_XATTR) == b"y":
                marker = tarfile.TarInfo(f"{rel}/{OPAQUE_MARKER}")
                marker.mtime = 0
                tar.addfile(marker, io.BytesIO(b""))
    return hasher.digest()


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._h = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._h.update(data)
        self._out.write(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def remove_tree(path: Path) -> None:
    """rm -rf that copes with read-only directories (unpacked layers keep their modes)."""
    if not os.path.lexists(path):
        return

    def onerror(func: Any, p: str, exc: Any) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except FileNotFoundError:
            pass

    import shutil  # noqa: PLC0415

    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path, onerror=onerror)
