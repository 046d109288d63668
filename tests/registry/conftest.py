"""Fixtures for the registry tests: real registries on loopback (plain, htpasswd, token,
TLS), a token server, a fault-injecting proxy, images pushed by skopeo, and a `Cli` that
runs `sandbox` with its own store and config dirs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SANDBOX, Runner, need

from .servers import FaultProxy, Registry, TokenServer, start_registry

USERS = {"alice": "secret"}


def _needs_tools() -> None:
    for tool in ("docker-registry", "skopeo", "htpasswd"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/install.sh)")


@dataclass
class Cli:
    """`sandbox` with a private store (``home``) and private config dirs."""

    home: Path
    config: Path
    env: dict[str, str]

    def run(self, *args: str, input: str | None = None, timeout: float = 180,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SANDBOX, *args], capture_output=True, text=True, input=input,
                              env={**self.env, **(extra_env or {})}, timeout=timeout,
                              check=False)

    def ok(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, **kw)
        assert proc.returncode == 0, f"sandbox {' '.join(args)}: {proc.stderr}"
        return proc

    def fails(self, *args: str, **kw: Any) -> str:
        """Run a command that must fail with one line on stderr and exit 125."""
        proc = self.run(*args, **kw)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 125, (proc.returncode, proc.stderr)
        assert err and err[-1].startswith("sandbox: error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        return err[-1]

    def write_config(self, text: str) -> None:
        (self.config / "sandbox").mkdir(parents=True, exist_ok=True)
        (self.config / "sandbox" / "registries.toml").write_text(text)

    def store_blobs(self) -> dict[str, bytes]:
        blobs = self.home / "blobs" / "sha256"
        return {p.name: p.read_bytes() for p in blobs.iterdir()} if blobs.is_dir() else {}

    def images(self) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for i in json.loads(self.ok("images", "--json").stdout)}

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.ok("image", "inspect", name).stdout)  # type: ignore[no-any-return]


@pytest.fixture
def cli() -> Iterator[Cli]:
    """A fresh store and config, readable by root only (the test runs as root)."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-regtest-"))
    home, config = base / "store", base / "config"
    config.mkdir()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(SANDBOX_HOME=str(home), XDG_CONFIG_HOME=str(config),
               DOCKER_CONFIG=str(config / "docker"))
    env.pop("SANDBOX_REGISTRIES_CONFIG", None)
    env.pop("SANDBOX_AUTH_FILE", None)
    env.pop("SANDBOX_PULL", None)  # the top conftest forbids pulls; here they go to loopback
    yield Cli(home, config, env)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An anonymous registry."""
    _needs_tools()
    reg = start_registry()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[Registry]:
    """A registry with htpasswd Basic auth (alice / secret)."""
    _needs_tools()
    reg = start_registry(htpasswd=USERS)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    directory = Path(tempfile.mkdtemp(prefix="sandbox-token-"))
    server = TokenServer(directory, USERS, {"": ["pull"], "alice": ["pull", "push"]})
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def token_registry(token_server: TokenServer) -> Iterator[Registry]:
    """A registry with Bearer token auth: anonymous pull, alice may push."""
    _needs_tools()
    reg = start_registry(token=token_server)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry() -> Iterator[Registry]:
    """An anonymous registry behind TLS with a self-signed certificate."""
    _needs_tools()
    reg = start_registry(tls=True)
    yield reg
    reg.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault-injecting reverse proxy in front of `registry` (a fresh one per test)."""
    server = FaultProxy(registry)
    yield server
    server.stop()


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    proc = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra,
                           src, dest], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def skopeo_digest(ref: str, *extra: str) -> str:
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *extra,
                           f"docker://{ref}"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["Digest"])


def _tar_entry(tar: tarfile.TarFile, name: str, data: bytes | None = None, *,
               mode: int = 0o755, link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = 1_700_000_000
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    elif data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_oci_layout(directory: Path, tag: str, files: dict[str, bytes],
                     links: dict[str, str]) -> None:
    """An OCI image layout with one gzip layer, built without `sandbox` (so "elsewhere")."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted({os.path.dirname(p) for p in [*files, *links]} - {""}):
            _tar_entry(tar, d)
        for path, data in sorted(files.items()):
            _tar_entry(tar, path, data)
        for path, target in sorted(links.items()):
            _tar_entry(tar, path, link=target)
    tar_bytes = raw.getvalue()
    layer = gzip.compress(tar_bytes, mtime=0)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (directory / "blobs" / "sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
                         "created": "2024-01-01T00:00:00Z",
                         "history": [{"created": "2024-01-01T00:00:00Z",
                                      "created_by": "tests/registry/conftest.py"}],
                         "rootfs": {"type": "layers",
                                    "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes)
                                                 .hexdigest()]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(layer), "size": len(layer)}]}).encode()
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(manifest), "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


@pytest.fixture(scope="session")
def foreign(registry: Registry) -> str:
    """A busybox image built here by hand (not by `sandbox`) and pushed by skopeo, three
    ways: ``REG/foreign/bb:gzip`` (OCI, gzip), ``:zstd`` (OCI, zstd) and ``:v2s2`` (Docker
    schema 2). Returns ``REG/foreign/bb``."""
    busybox = Path("/bin/busybox")
    need(busybox.is_file(), "busybox-static is not installed")
    directory = Path(tempfile.mkdtemp(prefix="sandbox-oci-"))
    try:
        write_oci_layout(directory, "1", {"bin/busybox": busybox.read_bytes()},
                         {"bin/sh": "busybox", "bin/echo": "busybox", "bin/cat": "busybox"})
        name = f"{registry.host}/foreign/bb"
        src = f"oci:{directory}:1"
        skopeo_copy(src, f"docker://{name}:zstd", "--dest-compress-format", "zstd",
                    "--dest-compress")
        skopeo_copy(src, f"docker://{name}:gzip")
        skopeo_copy(src, f"docker://{name}:v2s2", "--format", "v2s2")
    finally:
        shutil.rmtree(directory)
    return name


@pytest.fixture(scope="session")
def local_busybox(root_runner: Runner) -> str:
    """The OCI layout of root's store, which holds the shipped busybox image."""
    home = os.environ.get("SANDBOX_HOME") or str(Path.home() / ".local/share/sandbox")
    return home
