"""Registry credentials and ``WWW-Authenticate`` challenges.

Credentials are looked up, per registry host, in:

1. ``auth.toml`` (``$SANDBOX_AUTH_FILE``, else ``~/.config/sandbox/auth.toml``), written by
   `sandbox login` with mode 0600::

       ["registry.example.com:5000"]
       username = "alice"
       password = "s3cret"

2. Docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``):
   ``auths.HOST.auth`` (base64 of ``user:password``) or ``username``/``password``. Credential
   helpers (``credsStore``, ``credHelpers``) are not run.

Passwords are stored in clear text in a file only its owner can read, as Docker does
without a helper.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ImageError
from .reference import DOCKER_HUB, parse_registry

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_PARAM_RE = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    source: str  # the file they came from, for messages

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def credentials_path() -> Path:
    if env := os.environ.get("SANDBOX_AUTH_FILE"):
        return Path(env)
    return config.config_dir() / "auth.toml"


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ImageError(f"{path}: {e}") from None


def _docker_key(key: str) -> str | None:
    try:
        return parse_registry(key)
    except ImageError:
        return None


def find_credentials(registry: str) -> Credentials | None:
    """Credentials for ``registry`` (host[:port], ``docker.io`` for Docker Hub), or None."""
    path = credentials_path()
    entry = _read_toml(path).get(registry)
    if isinstance(entry, dict) and isinstance(entry.get("username"), str):
        return Credentials(entry["username"], str(entry.get("password", "")), str(path))
    return _docker_credentials(registry)


def _docker_credentials(registry: str) -> Credentials | None:
    path = docker_config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: {e}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _docker_key(str(key)) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ImageError(f"{path}: malformed auth entry for {key}") from None
            if sep:
                return Credentials(user, password, str(path))
        if isinstance(entry.get("username"), str):
            return Credentials(entry["username"], str(entry.get("password", "")), str(path))
    return None


def _toml_string(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _write_private(path: Path, entries: dict[str, Any]) -> None:
    """Write ``entries`` (host -> {username, password}) as TOML, mode 0600, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = ["# written by `sandbox login`; keep private (mode 0600)"]
    for host in sorted(entries):
        entry = entries[host]
        if not isinstance(entry, dict):
            continue
        lines.append(f"\n[{_toml_string(host)}]")
        for key in ("username", "password"):
            lines.append(f"{key} = {_toml_string(str(entry.get(key, '')))}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth-")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_credentials(registry: str, username: str, password: str) -> Path:
    """Store credentials for ``registry`` in auth.toml; returns its path."""
    path = credentials_path()
    entries = _read_toml(path)
    entries[registry] = {"username": username, "password": password}
    _write_private(path, entries)
    return path


def remove_credentials(registry: str) -> bool:
    """Forget ``registry``'s credentials in auth.toml; False if there were none."""
    path = credentials_path()
    entries = _read_toml(path)
    if registry not in entries:
        return False
    del entries[registry]
    _write_private(path, entries)
    return True


def login_key(registry: str) -> str:
    """How Docker's config.json names a registry (Docker Hub has a legacy URL)."""
    return DOCKER_HUB_KEY if registry == DOCKER_HUB else registry


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str               # "bearer" or "basic" (lower case)
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` -> `Challenge`."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)
