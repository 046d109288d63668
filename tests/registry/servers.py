"""Real servers for the registry tests, all on 127.0.0.1 with random ports:

- `Registry`: Debian's ``docker-registry`` (the CNCF distribution registry) in a temp dir,
  optionally with htpasswd Basic auth, Bearer token auth (trusting `TokenServer`'s
  certificate) or TLS. Stopped by pid; its dir removed.
- `TokenServer`: a small token service for the Bearer flow (the registry's ``auth: token``):
  it checks Basic credentials, grants actions per user and signs RS256 JWTs carrying its
  certificate in ``x5c``, which the registry verifies against its ``rootcertbundle``.
- `FaultProxy`: a reverse proxy in front of a registry that can break things on purpose
  (drop a blob mid-way, corrupt a blob, answer 500 a few times, serve a crafted manifest).
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_cert(directory: Path, name: str = "cert") -> tuple[Path, Path, Any]:
    """A self-signed certificate for 127.0.0.1 (RSA 2048): (cert.pem, key.pem, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path, (key, cert)


class _Server:
    """A ThreadingHTTPServer on a random loopback port, served from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


# --------------------------------------------------------------------------- token server


class _TokenHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        server: TokenServer = self.server.owner  # type: ignore[attr-defined]
        query = parse_qs(urlsplit(self.path).query)
        user = None
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if server.users.get(name) != password:
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"details": "bad credentials"}')
                return
            user = name
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        server.requests.append({"user": user, "scopes": scopes,
                                "service": query.get("service", [""])[0]})
        allowed = set(server.grants.get(user or "", ()))
        if user is None and not server.anonymous:
            allowed = set()
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": kind, "name": name, "actions": granted})
        if user is None and scopes and not any(a["actions"] for a in access):
            self.send_response(401)
            self.end_headers()
            return
        token = server.sign(user or "", access)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300,
                           "issued_at": datetime.datetime.now(datetime.UTC)
                           .isoformat()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenServer(_Server):
    """Grants ``grants[user]`` actions (``""`` is anonymous) to any repository."""

    def __init__(self, directory: Path, users: dict[str, str], grants: dict[str, list[str]],
                 *, anonymous: bool = True, issuer: str = "test-issuer",
                 service: str = "test-registry") -> None:
        self.users = users
        self.grants = grants
        self.anonymous = anonymous
        self.issuer = issuer
        self.service = service
        self.requests: list[dict[str, Any]] = []
        self.cert_path, _, (self._key, cert) = make_cert(directory, "token")
        from cryptography.hazmat.primitives import serialization

        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        super().__init__(_TokenHandler)

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


# --------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """A running ``docker-registry``; `host` is ``127.0.0.1:PORT``."""

    directory: Path
    port: int
    proc: subprocess.Popen[bytes]
    tls: bool = False
    users: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_registry(*, htpasswd: dict[str, str] | None = None,
                   token: TokenServer | None = None, tls: bool = False) -> Registry:
    """Start docker-registry on a random loopback port; wait until /v2/ answers."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-registry-"))
    port = free_port()
    lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {directory / 'data'}",
             "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{port}",
             "  secret: sandbox-tests"]
    if tls:
        cert, key, _ = make_cert(directory)
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
    if htpasswd:
        entries = []
        for user, password in htpasswd.items():
            out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                                 capture_output=True, text=True).stdout.strip()
            entries.append(out)
        (directory / "htpasswd").write_text("\n".join(entries) + "\n")
        lines += ["auth:", "  htpasswd:", "    realm: sandbox-tests",
                  f"    path: {directory / 'htpasswd'}"]
    elif token is not None:
        lines += ["auth:", "  token:", f"    realm: {token.realm}",
                  f"    service: {token.service}", f"    issuer: {token.issuer}",
                  f"    rootcertbundle: {token.cert_path}"]
    # schema 1 is what the registry converts to for clients that do not ask for schema 2:
    # enabled so that our refusal of it can be tested
    lines += ["compatibility:", "  schema1:", "    enabled: true"]
    config = directory / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    registry = Registry(directory, port, proc, tls=tls, users=dict(htpasswd or {}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            registry.stop()
            raise RuntimeError(f"docker-registry exited: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return registry
        except OSError:
            time.sleep(0.05)
    registry.stop()
    raise RuntimeError("docker-registry did not start")


# --------------------------------------------------------------------------- fault proxy

Fault = Callable[["_ProxyHandler", str, str], bool]

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
               "upgrade", "trailer"}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        self.body = body
        proxy.log.append({"method": self.command, "path": self.path,
                          "range": self.headers.get("Range"), "size": len(body)})
        for fault in list(proxy.faults):
            if fault(self, self.command, self.path):
                return
        self.forward(body)

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def upstream(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """The upstream's answer to this request: status, reason, headers, body."""
        proxy: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def forward(self, body: bytes, *, transform: Callable[[bytes], bytes] | None = None,
                cut_at: int | None = None,
                headers: Callable[[str, str], str] | None = None) -> None:
        """Send the request upstream and relay the answer (optionally altered)."""
        status, reason, upstream_headers, data = self.upstream(body)
        if transform is not None:
            data = transform(data)
        self.send_response(status, reason)
        for key, value in upstream_headers:
            if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                self.send_header(key, headers(key, value) if headers else value)
        self.send_header("Content-Length", str(len(data)))
        if cut_at is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            if cut_at is not None:
                self.wfile.write(data[:cut_at])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle


class FaultProxy(_Server):
    """A reverse proxy to ``upstream`` (a `Registry`); ``faults`` are tried in order on each
    request, the first that returns True has answered it."""

    def __init__(self, upstream: Registry) -> None:
        self.upstream_port = upstream.port
        self.faults: list[Fault] = []
        self.log: list[dict[str, Any]] = []
        super().__init__(_ProxyHandler)


def is_blob_get(method: str, path: str, digest: str | None = None) -> bool:
    path = urlsplit(path).path
    return method == "GET" and "/blobs/sha256:" in path and (digest is None
                                                              or path.endswith(digest))


def drop_blob_once(digest: str | None = None, fraction: float = 0.5) -> Fault:
    """Cut the first full GET of a blob after ``fraction`` of its bytes."""
    state = {"done": False}

    def fault(handler: _ProxyHandler, method: str, path: str) -> bool:
        if state["done"] or not is_blob_get(method, path, digest) or handler.headers.get("Range"):
            return False
        state["done"] = True
        size = len(handler.upstream(b"")[3])
        handler.forward(b"", cut_at=max(1, int(size * fraction)))
        return True

    return fault


def corrupt_blobs(digest: str | None = None) -> Fault:
    """Flip a byte in every GET of a blob (same size, wrong digest)."""
    def fault(handler: _ProxyHandler, method: str, path: str) -> bool:
        if not is_blob_get(method, path, digest):
            return False
        handler.forward(b"", transform=lambda d: bytes([d[0] ^ 0xFF]) + d[1:] if d else d)
        return True

    return fault


def fail_times(n: int, status: int = 500, match: str = "/v2/") -> Fault:
    """Answer ``status`` to the first ``n`` requests whose path contains ``match``."""
    state = {"left": n}

    def fault(handler: _ProxyHandler, method: str, path: str) -> bool:
        if state["left"] <= 0 or match not in path:
            return False
        state["left"] -= 1
        handler.reply(status, b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}',
                      {"Content-Type": "application/json", "Retry-After": "0"})
        return True

    return fault


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
