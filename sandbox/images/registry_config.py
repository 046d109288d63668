"""Registry settings from ``registries.toml`` (``$SANDBOX_REGISTRIES_CONFIG``, else
``~/.config/sandbox/registries.toml``). Every key is optional::

    concurrent_downloads = 3      # blobs fetched at once
    retries = 5                   # attempts per request on connection errors, 429 and 5xx
    backoff = 0.5                 # seconds before the first retry; doubles each time
    timeout = 30                  # seconds without progress before a request fails
    chunk_size = "16M"            # blobs larger than this are uploaded in chunks of this size

    [registries."docker.io"]
    mirrors = ["https://mirror.example.com", "127.0.0.1:5001"]   # tried in order for pulls

    [registries."registry.example.com:5000"]
    insecure = true               # TLS without verification, then plain HTTP
    ca_file = "/etc/ssl/private-ca.pem"   # or: verify TLS against this CA bundle

Registries on loopback (127.0.0.0/8, ::1, localhost) are insecure unless their table says
``insecure = false``. Credentials live elsewhere (see `auth`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ImageError, SpecError
from ..units import parse_size
from .reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback, parse_registry


def config_path() -> Path:
    if env := os.environ.get("SANDBOX_REGISTRIES_CONFIG"):
        return Path(env)
    return config.config_dir() / "registries.toml"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to talk the distribution API to: a registry or one of its mirrors."""

    host: str                         # host[:port] of the HTTP server
    registry: str                     # the registry it serves (for credentials)
    insecure: bool = False            # skip TLS verification, fall back to plain HTTP
    scheme: str | None = None         # forced by a mirror URL ("http" or "https")
    ca_file: str | None = None
    mirror: bool = False


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    insecure: bool | None = None
    ca_file: str | None = None
    mirrors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RegistriesConfig:
    """What registries.toml says (defaults when it is absent)."""

    registries: dict[str, RegistrySettings] = field(default_factory=dict)
    concurrent_downloads: int = 3
    retries: int = 5
    backoff: float = 0.5
    timeout: float = 30.0
    chunk_size: int = 16 << 20
    path: Path | None = None

    def settings(self, host: str) -> RegistrySettings:
        return self.registries.get(host) or RegistrySettings()

    def endpoint(self, registry: str, *, insecure: bool = False) -> Endpoint:
        """The registry itself (``insecure`` comes from ``--insecure``)."""
        settings = self.settings(registry)
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        return Endpoint(host=host, registry=registry,
                        insecure=insecure or _insecure(settings, host),
                        ca_file=settings.ca_file)

    def pull_endpoints(self, registry: str, *, insecure: bool = False) -> list[Endpoint]:
        """The registry's mirrors in order, then the registry."""
        out = []
        for mirror in self.settings(registry).mirrors:
            scheme, _, rest = mirror.rpartition("://")
            host = parse_registry(rest)
            settings = self.settings(host)
            out.append(Endpoint(host=host, registry=registry, scheme=scheme or None,
                                insecure=insecure or _insecure(settings, host),
                                ca_file=settings.ca_file, mirror=True))
        out.append(self.endpoint(registry, insecure=insecure))
        return out


def _insecure(settings: RegistrySettings, host: str) -> bool:
    return settings.insecure if settings.insecure is not None else is_loopback(host)


def load(path: Path | None = None) -> RegistriesConfig:
    """Read registries.toml; a missing file gives the defaults."""
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return RegistriesConfig()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ImageError(f"{path}: {e}") from None
    try:
        return _parse(data, path)
    except (TypeError, ValueError, SpecError, ImageError) as e:
        raise ImageError(f"{path}: {e}") from None


def _parse(data: dict[str, Any], path: Path) -> RegistriesConfig:
    known = {"concurrent_downloads", "retries", "backoff", "timeout", "chunk_size",
             "registries"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    registries: dict[str, RegistrySettings] = {}
    for host, table in (data.get("registries") or {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"registries.{host!r} must be a table")
        extra = sorted(set(table) - {"insecure", "ca_file", "mirrors"})
        if extra:
            raise ValueError(f"unknown key {extra[0]!r} in registries.{host!r}")
        insecure = table.get("insecure")
        if insecure is not None and not isinstance(insecure, bool):
            raise ValueError(f"registries.{host!r}.insecure must be true or false")
        mirrors = table.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise ValueError(f"registries.{host!r}.mirrors must be a list of strings")
        ca_file = table.get("ca_file")
        if ca_file is not None and not isinstance(ca_file, str):
            raise ValueError(f"registries.{host!r}.ca_file must be a path")
        for mirror in mirrors:
            parse_registry(mirror.rpartition("://")[2])
        registries[parse_registry(host)] = RegistrySettings(insecure, ca_file, tuple(mirrors))
    concurrent = int(data.get("concurrent_downloads", 3))
    retries = int(data.get("retries", 5))
    backoff = float(data.get("backoff", 0.5))
    timeout = float(data.get("timeout", 30))
    chunk = parse_size(data.get("chunk_size", 16 << 20))
    if not 1 <= concurrent <= 64 or not 1 <= retries <= 100 or not 0 <= backoff <= 60:
        raise ValueError("concurrent_downloads (1-64), retries (1-100) or backoff (0-60 s) "
                         "out of range")
    if timeout <= 0 or chunk < 1024:
        raise ValueError("timeout must be positive and chunk_size at least 1K")
    return RegistriesConfig(registries, concurrent, retries, backoff, timeout, chunk, path)
