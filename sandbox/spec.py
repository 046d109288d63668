"""The one vocabulary: what a job is (`JobSpec`, `Limits`, `File`) and what came of it (`Result`).

Everything here is a frozen, validated dataclass that turns into plain dicts (for msgpack and
JSON) and back. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import verdict
from .errors import SpecError
from .units import parse_seconds, parse_size


class Status(enum.StrEnum):
    """The verdict of a job."""

    OK = "ok"
    NONZERO_EXIT = "nonzero_exit"
    SIGNALED = "signaled"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    INTERNAL_ERROR = "internal_error"


_LIMIT_PARSERS: dict[str, Any] = {
    "time": parse_seconds,
    "wall_time": parse_seconds,
    "memory": parse_size,
    "pids": int,
    "output": parse_size,
    "disk": parse_size,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Resource limits of a whole job; ``None`` means "the profile's default".

    ``time`` is CPU seconds of all processes and threads; ``wall_time`` is real seconds;
    ``memory`` is bytes (swap included); ``pids`` counts tasks; ``output`` is stdout plus
    stderr bytes; ``disk`` bounds everything the job may write. Strings such as ``"256M"``
    and ``"1.5s"`` are accepted and normalised.
    """

    time: float | None = None
    wall_time: float | None = None
    memory: int | None = None
    pids: int | None = None
    output: int | None = None
    disk: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            try:
                parsed = _LIMIT_PARSERS[f.name](value)
            except (TypeError, ValueError):
                raise SpecError(f"invalid {f.name} limit {value!r}") from None
            except SpecError as e:
                raise SpecError(f"{f.name}: {e}") from None
            if f.name == "pids" and not 1 <= parsed <= 1 << 22:
                raise SpecError(f"invalid pids limit {value!r}: must be 1 to {1 << 22}")
            if f.name in ("memory", "disk") and parsed < 65536:
                raise SpecError(f"invalid {f.name} limit {value!r}: must be at least 64K")
            object.__setattr__(self, f.name, parsed)

    def over(self, base: Limits) -> Limits:
        """These limits, with every unset one taken from ``base``."""
        return Limits(**{f.name: _first(getattr(self, f.name), getattr(base, f.name))
                         for f in fields(self)})

    def missing(self) -> list[str]:
        """Names of the limits that are still unset."""
        return [f.name for f in fields(self) if getattr(self, f.name) is None]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SpecError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


_NAME_RE = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+/-]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class File:
    """A file copied into the job's work dir before it starts (``name`` is relative)."""

    name: str
    data: bytes
    mode: int = 0o644

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.data, bytes):
            raise SpecError("a file needs a name (a string) and data (bytes)")
        if not isinstance(self.mode, int) or isinstance(self.mode, bool):
            raise SpecError(f"invalid file mode {self.mode!r} for {self.name}")
        parts = self.name.split("/")
        if (not _NAME_RE.match(self.name) or any(p in ("", ".", "..") for p in parts)):
            raise SpecError(f"invalid file name {self.name!r}: must be a relative path")
        if not 0 <= self.mode <= 0o777:
            raise SpecError(f"invalid file mode {oct(self.mode)} for {self.name}")


_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """Turn ``["K=V", ...]`` into a dict, refusing malformed entries."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY_RE.match(key):
            raise SpecError(f"invalid environment variable {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One job: run ``argv`` in ``image`` under ``profile`` with ``limits``.

    ``argv`` is a command looked up in the image (empty: the image's ENTRYPOINT + CMD).
    With ``entrypoint=True``, ``argv[0]`` names one of ``files``, a script copied in: it
    runs directly when it is an ELF binary or starts with ``#!``, else through the image's
    script runner (label ``sandbox.script-runner``, else its ENTRYPOINT; this is how
    ``sandbox exec script.py`` becomes ``python3 script.py`` in ``py3``). ``host_path``:
    the absolute path PROGRAM was given as on the caller's machine; the image's own file
    of that path wins over the copy (see `sandbox.supervisor.program`). ``workdir`` and
    ``user`` override the image's WORKDIR and USER; ``read_only`` makes the root
    read-only (it is a throw-away writable layer otherwise, bounded by the disk limit).
    """

    image: str
    argv: tuple[str, ...]
    files: tuple[File, ...] = ()
    stdin: bytes | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    profile: str = "default"
    entrypoint: bool = False
    host_path: str = ""
    workdir: str | None = None
    user: str | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.argv, str):
            raise SpecError("argv must be a sequence of strings, not a string")
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "files", tuple(self.files))
        if not self.argv and not self.entrypoint:
            raise SpecError("nothing to run: argv is empty")
        if not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise SpecError("argv entries must be strings without NUL bytes")
        if not isinstance(self.env, Mapping):
            raise SpecError("env must be a mapping of names to strings")
        for key, value in self.env.items():
            if (not isinstance(key, str) or not isinstance(value, str)
                    or not _ENV_KEY_RE.match(key) or "\0" in value):
                raise SpecError(f"invalid environment variable {key!r}")
        if not isinstance(self.image, str) or not self.image:
            raise SpecError("no image given")
        if not isinstance(self.profile, str) or not re.match(r"^[a-z0-9][a-z0-9_.-]*$",
                                                             self.profile):
            raise SpecError(f"invalid profile name {self.profile!r}")
        if self.stdin is not None and not isinstance(self.stdin, bytes):
            raise SpecError("stdin must be bytes")
        if not isinstance(self.entrypoint, bool) or not isinstance(self.read_only, bool):
            raise SpecError("entrypoint and read_only must be true or false")
        if not isinstance(self.host_path, str) or "\0" in self.host_path:
            raise SpecError("host_path must be a path")
        if self.workdir is not None and (
                not isinstance(self.workdir, str) or not self.workdir.startswith("/")
                or ".." in self.workdir.split("/") or "\0" in self.workdir):
            raise SpecError(f"invalid work dir {self.workdir!r}: must be an absolute path")
        if self.user is not None and (not isinstance(self.user, str)
                                      or not re.match(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$",
                                                      self.user)):
            raise SpecError(f"invalid user {self.user!r}: expected NAME, UID, NAME:GROUP "
                            "or UID:GID")
        if not all(isinstance(f, File) for f in self.files):
            raise SpecError("files must be File objects")
        names = [f.name for f in self.files]
        if len(names) != len(set(names)):
            raise SpecError("two files with the same name")
        if isinstance(self.limits, Mapping):
            object.__setattr__(self, "limits", Limits.from_dict(self.limits))

    def with_limits(self, limits: Limits) -> JobSpec:
        return replace(self, limits=limits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "argv": list(self.argv),
            "files": [{"name": f.name, "data": f.data, "mode": f.mode} for f in self.files],
            "stdin": self.stdin,
            "env": dict(self.env),
            "limits": self.limits.to_dict(),
            "profile": self.profile,
            "entrypoint": self.entrypoint,
            "host_path": self.host_path,
            "workdir": self.workdir,
            "user": self.user,
            "read_only": self.read_only,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        try:
            return cls(
                image=data["image"],
                argv=tuple(data["argv"]),
                files=tuple(File(**f) for f in data.get("files", ())),
                stdin=data.get("stdin"),
                env=dict(data.get("env", {})),
                limits=Limits.from_dict(data.get("limits", {})),
                profile=data.get("profile", "default"),
                entrypoint=bool(data.get("entrypoint", False)),
                host_path=data.get("host_path") or "",
                workdir=data.get("workdir"),
                user=data.get("user"),
                read_only=bool(data.get("read_only", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpecError(f"malformed job spec: {e}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """What came of a job. ``stdout``/``stderr`` are raw bytes; see `to_json`."""

    status: Status
    exit_code: int | None = None
    signal: int | None = None
    cpu_time: float = 0.0
    wall_time: float = 0.0
    memory: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    setup_time: float = 0.0
    message: str = ""

    @property
    def cli_exit_code(self) -> int:
        """The exit code `sandbox exec` returns (see `verdict.cli_exit_code`)."""
        return verdict.cli_exit_code(self.to_dict())

    def summary(self) -> str:
        """A one-line human summary (printed by the CLI when the status is not ``ok``)."""
        return verdict.summary(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Wire form (msgpack): bytes stay bytes."""
        return {f.name: (getattr(self, f.name).value if f.name == "status"
                         else getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: output decoded as UTF-8 with invalid bytes replaced."""
        return verdict.json_view(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        try:
            kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            kwargs["status"] = Status(data["status"])
            return cls(**kwargs)
        except (KeyError, ValueError, TypeError) as e:
            raise SpecError(f"malformed result: {e}") from None
