"""Image references, parsed and normalised the way Docker does.

```
python                          -> docker.io/library/python:latest
python:3.12-slim                -> docker.io/library/python:3.12-slim
me/app@sha256:HEX               -> docker.io/me/app@sha256:HEX
127.0.0.1:5000/team/app:1       -> 127.0.0.1:5000/team/app:1
```

The first path component is a registry host when it contains ``.`` or ``:``, is
``localhost``, or has an upper-case letter; otherwise the registry is ``docker.io``, where a
one-component name lives under ``library/``. Pure: no I/O.

Local names and registry names: images built here keep the name they were given (``py3``
is stored as ``py3:latest``); pulled images are stored under their full reference. A name is
looked up as given first, then in its full form (`lookup_names`), so a local ``py3`` always
wins and ``python`` finds a pulled ``docker.io/library/python:latest``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import ImageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]{1,5})?$")
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised reference: ``registry/repository[:tag][@digest]``."""

    registry: str            # host[:port] as the user names it ("docker.io", "127.0.0.1:5000")
    repository: str          # "library/python"
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` (no tag or digest)."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Where the distribution API lives (Docker Hub's is not ``docker.io``)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def store_name(self) -> str:
        """The name a pulled image gets in the store: by digest when pulled by digest."""
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def in_repository(self, repository: str) -> Reference:
        return Reference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return None, name


def is_qualified(text: str) -> bool:
    """Does ``text`` name its registry explicitly (``host[:port]/...``)?"""
    return _split_domain(text.strip())[0] is not None


def parse(text: str) -> Reference:
    """Parse and normalise ``text``; raises `ImageError` with a one-line reason."""
    raw = text.strip()
    if not raw or len(raw) > MAX_NAME + 200 or any(c.isspace() for c in raw):
        raise ImageError(f"invalid image reference {text!r}")
    rest, _, digest = raw.partition("@")
    if digest:
        if not digest.startswith("sha256:"):
            raise ImageError(f"invalid image reference {text!r}: only sha256 digests are "
                             "supported")
        if not _DIGEST_RE.match(digest):
            raise ImageError(f"invalid image reference {text!r}: malformed digest")
    domain, path = _split_domain(rest)
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG_RE.match(tag):
            raise ImageError(f"invalid image reference {text!r}: malformed tag {tag!r}")
    if domain is not None and not _HOST_RE.match(domain):
        raise ImageError(f"invalid image reference {text!r}: malformed registry {domain!r}")
    if domain is None or domain in ("index.docker.io", DOCKER_HUB):
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if not _PATH_RE.match(path):
        raise ImageError(f"invalid image reference {text!r}: repository names are lower-case "
                         "letters, digits and separators (. _ __ -) between path components")
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise ImageError(f"invalid image reference {text!r}: name longer than {MAX_NAME}")
    if tag is None and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest or None)


def parse_registry(text: str) -> str:
    """A registry host as given to `sandbox login` (``https://`` and paths are dropped)."""
    host = text.strip()
    for prefix in ("https://", "http://"):
        host = host.removeprefix(prefix)
    host = host.split("/", 1)[0]
    if host in ("index.docker.io", DOCKER_HUB_API):
        host = DOCKER_HUB
    if not host or not _HOST_RE.match(host):
        raise ImageError(f"invalid registry {text!r} (expected host[:port])")
    return host


def lookup_names(text: str) -> list[str]:
    """Store names to try for ``text``, in order: as given (a local name wins), then its
    full registry form."""
    out = [text]
    try:
        full = parse(text).store_name
    except ImageError:
        return out
    if full != text:
        out.append(full)
    return out


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost`` (with or without a port): such registries
    are insecure by default, as in Docker."""
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
