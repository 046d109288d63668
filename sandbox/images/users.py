"""USER of an image (``name``, ``uid``, ``name:group``, ``uid:gid``) as ids, looked up in
its /etc/passwd and /etc/group (read from the layers, never following a symlink)."""

from __future__ import annotations

from . import layers


class NoSuchUser(LookupError):
    """The image has no such user or group; ``str()`` says which."""


def lookup(lower: list[str], user: str) -> tuple[int, int]:
    """``(uid, gid)`` of ``user`` in the image whose unpacked layers are ``lower``; a uid
    the image does not name gets its own number as the gid."""
    name, _, group = user.partition(":")
    passwd = _db(layers.read_merged(lower, "etc/passwd"))
    entry = passwd.get(name) or next((e for e in passwd.values() if e[0] == name), None)
    if name.isdigit():
        uid, gid = int(name), (int(entry[1]) if entry else int(name))
    elif entry:
        uid, gid = int(entry[0]), int(entry[1])
    elif name == "root":
        uid, gid = 0, 0
    else:
        raise NoSuchUser("no such user in the image's /etc/passwd")
    if group:
        groups = _db(layers.read_merged(lower, "etc/group"))
        if group.isdigit():
            gid = int(group)
        elif group in groups:
            gid = int(groups[group][0])
        else:
            raise NoSuchUser("no such group in the image's /etc/group")
    return uid, gid


def _db(text: str) -> dict[str, tuple[str, str]]:
    """``name -> (id, gid)`` from a passwd or group file's text."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit():
            out[fields[0]] = (fields[2], fields[3] if fields[3].isdigit() else fields[2])
    return out
