"""A client of the OCI distribution API (``/v2/``), for one registry endpoint.

Synchronous (httpx) and thread-safe: pulls and pushes move blobs from a few threads through
one `Client`. Every request goes through `Client.send`, which

- retries with exponential backoff on connection errors, 429 and 5xx (honouring a short
  ``Retry-After``), never on name-resolution or TLS-verification failures;
- answers a 401 once per token generation: ``Bearer`` challenges fetch a token from the
  realm (with the stored credentials, if any, and every scope this client needs), ``Basic``
  challenges send the stored credentials;
- turns 401, 403, 404 and other refusals into one-line `RegistryError` messages.

Nothing here trusts the registry: manifests are bounded in size and checked against their
digest, blobs are hashed while they stream and refused when they differ from the digest or
the size their descriptor names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import httpx

from ..errors import RegistryError
from .auth import Challenge, Credentials, find_credentials, parse_challenge
from .reference import is_loopback
from .registry_config import Endpoint, RegistriesConfig

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
              "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES)
MAX_MANIFEST = 4 << 20   # as containerd: a manifest or index larger than this is refused
MAX_SMALL_BODY = 1 << 20  # token and error responses
USER_AGENT = "sandbox/0.1 (+OCI distribution client)"
Body = bytes | Callable[[], Iterable[bytes]] | None


class TransferProgress(Protocol):
    """What a pull or push reports as blobs move (called from worker threads)."""

    def start(self, digest: str, size: int, action: str) -> None: ...
    def advance(self, digest: str, n: int) -> None: ...
    def finish(self, digest: str, status: str) -> None: ...
    def message(self, text: str) -> None: ...


class NullProgress:
    """Reports nothing."""

    def start(self, digest: str, size: int, action: str) -> None:
        return None

    def advance(self, digest: str, n: int) -> None:
        return None

    def finish(self, digest: str, status: str) -> None:
        return None

    def message(self, text: str) -> None:
        return None


class LineProgress(NullProgress):
    """Reports finished blobs and messages as lines (for the supervisor's progress)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit

    def finish(self, digest: str, status: str) -> None:
        self.emit(f"{short(digest)}: {status}")

    def message(self, text: str) -> None:
        self.emit(text)


class Aborted(Exception):
    """Another transfer of the same operation failed; this one stops early."""


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def parallel(fn: Callable[..., None], jobs: list[tuple[Any, ...]], workers: int,
             abort: threading.Event, name: str) -> None:
    """Run ``fn(*job)`` for every job on ``workers`` threads; on the first failure set
    ``abort`` (running jobs check it), cancel the rest and raise that failure."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))),
                            thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: stop the transfers before the pool waits for them
            abort.set()
            for f in futures:
                f.cancel()
            raise
        if any(f.exception() is not None for f in done):
            abort.set()
            for f in futures:
                f.cancel()
            wait(futures)
            errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
            raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value


def _retryable_transport(exc: BaseException) -> bool:
    """Connection errors are retried; name resolution and TLS verification failures are
    not (they do not get better)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror | ssl.SSLCertVerificationError):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


def _describe_transport(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return "name resolution failed"
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({seen.verify_message})"
        seen = seen.__cause__ or seen.__context__
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _error_detail(body: bytes) -> str:
    """The first message of a registry's JSON error body, if any."""
    try:
        data = json.loads(body)
        first = data["errors"][0]
        text = str(first.get("message") or first.get("code") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return " ".join(text.split())[:200]


class Client:
    """Talks to one registry endpoint on behalf of one operation (``scopes`` are the
    Bearer token scopes it needs, e.g. ``repository:library/python:pull``)."""

    def __init__(self, endpoint: Endpoint, cfg: RegistriesConfig, scopes: list[str], *,
                 credentials: Credentials | None = None, use_stored: bool = True) -> None:
        self.endpoint = endpoint
        self.cfg = cfg
        self.scopes = list(scopes)
        self.credentials = credentials
        if credentials is None and use_stored:
            self.credentials = find_credentials(endpoint.registry)
        self.base = ""
        self._authorization: str | None = None
        self._generation = 0
        self._lock = threading.Lock()
        verify: ssl.SSLContext | bool = not endpoint.insecure
        if endpoint.ca_file and not endpoint.insecure:
            verify = ssl.create_default_context(cafile=endpoint.ca_file)
        timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0))
        self.http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=True,
                                 trust_env=False, proxy=env_proxy(endpoint.host),
                                 headers={"User-Agent": USER_AGENT})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    @property
    def host(self) -> str:
        return self.endpoint.host

    # -- connection, retries, auth ---------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: pick the scheme, learn the auth challenge and get a token early."""
        if self.endpoint.scheme:
            schemes = [self.endpoint.scheme]
        elif self.endpoint.insecure:
            schemes = ["https", "http"]
        else:
            schemes = ["https"]
        last: Exception | None = None
        for attempt in range(self.cfg.retries):
            for scheme in schemes:
                try:
                    resp = self.http.get(f"{scheme}://{self.host}/v2/")
                except httpx.TransportError as e:
                    last = e
                    if not _retryable_transport(e) and scheme == schemes[-1]:
                        raise self._unreachable(e) from None
                    continue
                if resp.status_code in (429,) or resp.status_code >= 500:
                    last = RegistryError(f"{self.host} answered {resp.status_code}")
                    break
                if resp.status_code == 404:
                    raise RegistryError(f"{self.host} does not serve the registry API (/v2/ "
                                        "answered 404)")
                self.base = f"{scheme}://{self.host}"
                if resp.status_code == 401:
                    self._authenticate(resp, self._generation)
                elif resp.status_code >= 400:
                    raise RegistryError(f"{self.host}: /v2/ answered {resp.status_code} "
                                        f"{resp.reason_phrase}")
                return
            self.backoff(attempt, None)
        if isinstance(last, httpx.TransportError):
            raise self._unreachable(last)
        raise RegistryError(f"cannot reach {self.host}: {last} (gave up after "
                            f"{self.cfg.retries} attempts)")

    def _unreachable(self, exc: BaseException) -> RegistryError:
        hint = ""
        if "certificate" in _describe_transport(exc).lower():
            hint = " (use --insecure, or set ca_file in registries.toml)"
        return RegistryError(f"cannot reach {self.host}: {_describe_transport(exc)}{hint}")

    def backoff(self, attempt: int, resp: httpx.Response | None) -> None:
        """Sleep before retry number ``attempt`` (0-based)."""
        delay = self.cfg.backoff * (2 ** attempt)
        if resp is not None:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(resp.headers.get("retry-after", "")), 30.0))
        time.sleep(min(delay, 30.0))

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base + path

    def send(self, method: str, path: str, *, what: str, headers: dict[str, str] | None = None,
             body: Body = None, stream: bool = False, retry: bool = True,
             ok: tuple[int, ...] = (200,), params: dict[str, str] | None = None,
             ) -> httpx.Response:
        """Send a request (retrying, authenticating); a status not in ``ok`` raises
        `RegistryError` (404 included, unless listed). With ``stream`` the caller closes
        the response."""
        url = httpx.URL(self.url(path))
        if params:  # merged into the query (an upload Location carries its own state)
            url = url.copy_merge_params(params)
        attempt = 0
        authenticated_at = -1
        while True:
            with self._lock:
                generation = self._generation
                authorization = self._authorization
            req_headers = dict(headers or {})
            if authorization and _same_origin(str(url), self.base):
                req_headers["Authorization"] = authorization
            content = body() if callable(body) else body
            request = self.http.build_request(method, url, headers=req_headers,
                                              content=content)
            try:
                resp = self.http.send(request, stream=True)
            except httpx.TransportError as e:
                if not retry or not _retryable_transport(e) or attempt + 1 >= self.cfg.retries:
                    raise RegistryError(f"{what}: {self.host}: {_describe_transport(e)}"
                                        ) from None
                self.backoff(attempt, None)
                attempt += 1
                continue
            status = resp.status_code
            if status == 401 and authenticated_at != generation:
                resp.close()
                authenticated_at = self._authenticate(resp, generation)
                continue
            if retry and (status == 429 or status >= 500) and attempt + 1 < self.cfg.retries:
                resp.close()
                self.backoff(attempt, resp)
                attempt += 1
                continue
            if status not in ok:
                try:
                    detail = _error_detail(_read_bounded(resp, MAX_SMALL_BODY))
                except (RegistryError, httpx.TransportError):
                    detail = ""
                finally:
                    resp.close()
                raise self._refusal(resp, what, detail)
            if not stream:
                try:
                    resp.read()
                finally:
                    resp.close()
            return resp

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        resp = self.send(method, path, stream=True, **kw)
        try:
            yield resp
        finally:
            resp.close()

    def _refusal(self, resp: httpx.Response, what: str, detail: str) -> RegistryError:
        suffix = f" ({detail})" if detail else ""
        status = resp.status_code
        if status == 401:
            if self.credentials is None:
                return RegistryError(f"{what}: {self.host} requires authentication "
                                     f"(run `sandbox login {self.endpoint.registry}`){suffix}")
            return RegistryError(f"{what}: {self.host} refused the credentials of "
                                 f"{self.credentials.username!r} from "
                                 f"{self.credentials.source}{suffix}")
        if status == 403:
            return RegistryError(f"{what}: access denied by {self.host}{suffix}")
        if status == 404:
            return RegistryError(f"{what}: not found on {self.host}{suffix}")
        if status == 429 or status >= 500:
            return RegistryError(f"{what}: {self.host} answered {status} "
                                 f"{resp.reason_phrase} (gave up after {self.cfg.retries} "
                                 f"attempts){suffix}")
        return RegistryError(f"{what}: {self.host} answered {status} {resp.reason_phrase}"
                             f"{suffix}")

    def _authenticate(self, resp: httpx.Response, generation: int) -> int:
        """Answer a 401: returns the new token generation."""
        with self._lock:
            if self._generation != generation:  # another thread already did
                return self._generation
            challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
            if challenge is None or challenge.scheme not in ("bearer", "basic"):
                raise RegistryError(f"{self.host} requires authentication of an unsupported "
                                    f"kind ({resp.headers.get('www-authenticate', 'none')!r})")
            if challenge.scheme == "basic":
                if self.credentials is None:
                    raise RegistryError(f"{self.host} requires authentication (run `sandbox "
                                        f"login {self.endpoint.registry}`)")
                self._authorization = self.credentials.basic()
            else:
                self._authorization = "Bearer " + self._fetch_token(challenge)
            self._generation += 1
            return self._generation

    def _fetch_token(self, challenge: Challenge) -> str:
        realm = challenge.params.get("realm", "")
        parsed = httpx.URL(realm) if realm.startswith(("http://", "https://")) else None
        if parsed is None:
            raise RegistryError(f"{self.host} sent a Bearer challenge without a usable realm")
        realm_host = parsed.netloc.decode()
        scopes = [s for s in challenge.params.get("scope", "").split(" ") if s]
        scopes += [s for s in self.scopes if s not in scopes]
        params: list[tuple[str, str | int | float | bool | None]] = []
        if service := challenge.params.get("service"):
            params.append(("service", service))
        params += [("scope", s) for s in scopes]
        headers = {}
        if self.credentials is not None:
            if (parsed.scheme != "https" and not self.endpoint.insecure
                    and not is_loopback(realm_host)):
                raise RegistryError(f"{self.host} asks for credentials over plain HTTP at "
                                    f"{realm}: refused")
            headers["Authorization"] = self.credentials.basic()
            params.append(("account", self.credentials.username))
        last = ""
        for attempt in range(self.cfg.retries):
            try:
                resp = self.http.get(realm, params=params, headers=headers)
            except httpx.TransportError as e:
                last = _describe_transport(e)
                if not _retryable_transport(e):
                    break
                self.backoff(attempt, None)
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"{resp.status_code} {resp.reason_phrase}"
                self.backoff(attempt, resp)
                continue
            if resp.status_code in (401, 403):
                who = (f"the credentials of {self.credentials.username!r}"
                       if self.credentials else "anonymous access")
                hint = ("" if self.credentials
                        else f" (run `sandbox login {self.endpoint.registry}`)")
                raise RegistryError(f"token server {realm_host} refused {who} for "
                                    f"{' '.join(scopes) or self.host}{hint}")
            if resp.status_code != 200:
                raise RegistryError(f"token server {realm_host} answered {resp.status_code} "
                                    f"{resp.reason_phrase}")
            try:
                data = json.loads(resp.content[:MAX_SMALL_BODY])
                token = data.get("token") or data.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
                raise RegistryError(f"token server {realm_host} sent no usable token")
            return token
        raise RegistryError(f"cannot get a token from {realm_host}: {last}")

    # -- manifests -------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str, *, what: str) -> Manifest:
        """Fetch a manifest or index with content negotiation; verify its digest."""
        with self.stream("GET", f"/v2/{repository}/manifests/{reference}", what=what,
                         headers={"Accept": ACCEPT}) as resp:
            data = _read_bounded(resp, MAX_MANIFEST, what=f"{what}: manifest")
            content_type = resp.headers.get("content-type", "").split(";")[0].strip()
            header_digest = resp.headers.get("docker-content-digest", "")
        media_type = manifest_media_type(data, content_type, what)  # refuses schema 1
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{what}: the manifest does not match its digest {reference} "
                                f"(got {digest}): refused")
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise RegistryError(f"{what}: the manifest does not match the digest the registry "
                                f"announced ({header_digest}, got {digest}): refused")
        return Manifest(data, media_type, digest)

    def put_manifest(self, repository: str, reference: str, manifest: Manifest, *,
                     what: str) -> str:
        resp = self.send("PUT", f"/v2/{repository}/manifests/{reference}", what=what,
                         headers={"Content-Type": manifest.media_type}, body=manifest.data,
                         ok=(200, 201, 202))
        announced = resp.headers.get("docker-content-digest", "")
        if announced and announced != manifest.digest:
            raise RegistryError(f"{what}: the registry stored the manifest as {announced}, not "
                                f"{manifest.digest}")
        return manifest.digest

    # -- blobs -----------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str, *, what: str) -> bool:
        resp = self.send("HEAD", f"/v2/{repository}/blobs/{digest}", what=what, ok=(200, 404))
        return resp.status_code == 200

    def download_blob(self, repository: str, digest: str, size: int, out: IO[bytes], *,
                      what: str, progress: TransferProgress,
                      abort: threading.Event | None = None) -> None:
        """Stream a blob into ``out`` (an empty file), resuming with ``Range`` after a broken
        connection; raises `RegistryError` unless the bytes match ``digest`` and ``size``."""
        hasher = hashlib.sha256()
        got = 0
        failures = 0
        while True:
            headers = {"Accept-Encoding": "identity"}
            if got:
                headers["Range"] = f"bytes={got}-"
            try:
                with self.stream("GET", f"/v2/{repository}/blobs/{digest}", what=what,
                                 headers=headers, ok=(200, 206)) as resp:
                    if got and resp.status_code == 200:  # no Range support: start over
                        out.seek(0)
                        out.truncate()
                        progress.advance(digest, -got)
                        hasher, got = hashlib.sha256(), 0
                    elif got and not resp.headers.get("content-range", "").startswith(
                            f"bytes {got}-"):
                        raise RegistryError(f"{what}: the registry resumed at the wrong "
                                            f"offset ({resp.headers.get('content-range')})")
                    for chunk in resp.iter_raw(1 << 16):
                        if abort is not None and abort.is_set():
                            raise Aborted
                        got += len(chunk)
                        if got > size:
                            raise RegistryError(f"{what}: the registry sent more than the "
                                                f"{size} bytes the manifest declares: refused")
                        hasher.update(chunk)
                        out.write(chunk)
                        progress.advance(digest, len(chunk))
                        failures = 0
                break
            except httpx.TransportError as e:
                failures += 1
                if failures >= self.cfg.retries:
                    raise RegistryError(f"{what}: {self.host}: {_describe_transport(e)} (gave "
                                        f"up after {failures} attempts)") from None
                progress.message(f"{short(digest)}: connection broken after {got} bytes; "
                                 "resuming")
                self.backoff(failures - 1, None)
        actual = "sha256:" + hasher.hexdigest()
        if got != size or actual != digest:
            raise RegistryError(f"{what}: the registry sent content that does not match its "
                                f"digest (expected {digest} of {size} bytes, got {actual} of "
                                f"{got} bytes): refused")

    def start_upload(self, repository: str, *, what: str, mount: str | None = None,
                     source: str | None = None) -> tuple[bool, str]:
        """Open an upload session, or mount ``mount`` from repository ``source``: returns
        (mounted, upload location)."""
        params = {"mount": mount, "from": source} if mount and source else None
        resp = self.send("POST", f"/v2/{repository}/blobs/uploads/", what=what, params=params,
                         ok=(201, 202), retry=True)
        if resp.status_code == 201:
            return True, ""
        location = resp.headers.get("location")
        if not location:
            raise RegistryError(f"{what}: the registry opened an upload without a Location")
        return False, str(resp.url.join(location))

    def upload_blob(self, location: str, digest: str, size: int, path: Path, *, what: str,
                    progress: TransferProgress) -> None:
        """Upload a blob into an open session: one PUT when it fits ``chunk_size``, else
        PATCHes of ``chunk_size`` and a closing PUT."""
        chunk = self.cfg.chunk_size
        if size <= chunk:
            def whole() -> Iterator[bytes]:
                yield from _file_chunks(path, 0, size, progress, digest)

            resp = self.send("PUT", location, what=what, params={"digest": digest},
                             body=whole, retry=False, ok=(201, 204),
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Length": str(size)})
        else:
            offset = 0
            while offset < size:
                end = min(offset + chunk, size)

                def piece(start: int = offset, stop: int = end) -> Iterator[bytes]:
                    yield from _file_chunks(path, start, stop, progress, digest)

                resp = self.send("PATCH", location, what=what, body=piece, retry=False,
                                 ok=(202, 204),
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(end - offset),
                                          "Content-Range": f"{offset}-{end - 1}"})
                location = str(resp.url.join(resp.headers.get("location") or location))
                offset = end
            resp = self.send("PUT", location, what=what, params={"digest": digest},
                             retry=False, ok=(201, 204), body=b"",
                             headers={"Content-Length": "0"})
        announced = resp.headers.get("docker-content-digest", "")
        if announced and announced != digest:
            raise RegistryError(f"{what}: the registry stored {announced}, not {digest}")


def env_proxy(host: str) -> str | None:
    """The proxy from ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` for ``host``, unless
    ``NO_PROXY`` excludes it or it is on loopback."""
    if is_loopback(host):
        return None
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if urllib.request.proxy_bypass(name):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get("https") or proxies.get("http") or proxies.get("all")


def _same_origin(url: str, base: str) -> bool:
    if not base:
        return True
    a, b = httpx.URL(url), httpx.URL(base)
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _file_chunks(path: Path, start: int, stop: int, progress: TransferProgress,
                 digest: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            data = f.read(min(left, 1 << 16))
            if not data:
                raise RegistryError(f"blob {digest} is shorter than its descriptor says")
            left -= len(data)
            progress.advance(digest, len(data))
            yield data


def _read_bounded(resp: httpx.Response, limit: int, *, what: str = "response") -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RegistryError(f"{what} is larger than {limit} bytes: refused")
    parts = []
    total = 0
    for chunk in resp.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes: refused")
        parts.append(chunk)
    return b"".join(parts)


def manifest_media_type(data: bytes, content_type: str, what: str) -> str:
    """The media type of a fetched manifest: the Content-Type, checked against the body.
    Schema 1 and anything that is not one of the four known types are refused."""
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        raise RegistryError(f"{what}: the registry sent a manifest that is not JSON") from None
    declared = body.get("mediaType")
    if content_type in MT_SCHEMA1 or body.get("schemaVersion") == 1:
        raise RegistryError(f"{what}: the registry only has a Docker schema 1 manifest, an "
                            "obsolete format this tool does not pull (push the image again "
                            "with a current tool)")
    if content_type in MANIFEST_TYPES:
        if declared and declared != content_type:
            raise RegistryError(f"{what}: the manifest says it is {declared} but was served as "
                                f"{content_type}: refused")
        return content_type
    if content_type in ("", "application/json", "text/plain", "application/octet-stream"):
        if declared in MANIFEST_TYPES:
            return str(declared)
        if declared is None and body.get("schemaVersion") == 2:
            return MT_OCI_INDEX if "manifests" in body else MT_OCI_MANIFEST
    raise RegistryError(f"{what}: unsupported manifest type "
                        f"{content_type or declared or 'unknown'!r}")
