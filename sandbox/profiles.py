"""Profiles: ``profiles/NAME.toml`` -> a validated `Profile` (limits, job settings, rlimits,
seccomp policy). Readable TOML, so users can see and change what a job may do."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config
from .errors import ProfileError, SpecError
from .spec import Limits
from .units import parse_size

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_RLIMIT_NAMES = {"core", "cpu", "fsize", "nofile", "stack", "nproc", "memlock", "msgqueue", "as"}


@dataclass(frozen=True, slots=True)
class SeccompRule:
    """Fail ``syscall`` when its argument ``arg`` matches: ``(arg & mask) == value`` for one of
    ``matches`` (a list of (mask, value) pairs, OR-ed)."""

    syscall: str
    arg: int
    matches: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SeccompPolicy:
    default: str  # "allow" | "errno" | "kill"
    errno: int
    deny: tuple[str, ...]
    enosys: tuple[str, ...]
    allow: tuple[str, ...]
    rules: tuple[SeccompRule, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    path: Path
    description: str
    limits: Limits
    uid: int
    gid: int
    hostname: str
    workdir: str
    path_env: str
    lang: str
    rlimits: dict[str, tuple[int, int]]
    seccomp: SeccompPolicy
    digest: str = field(compare=False)


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ProfileError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProfileError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _parse_rule(item: Any, where: str) -> SeccompRule:
    if not isinstance(item, dict):
        raise ProfileError(f"{where}: each [[seccomp.rule]] must be a table")
    known = {"syscall", "arg", "any_bits", "unless_bits", "equals_32", "masked_eq"}
    if unknown := set(item) - known:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in a rule")
    syscall = _get(item, "syscall", str, where)
    arg = _get(item, "arg", int, where)
    if not 0 <= arg <= 5:
        raise ProfileError(f"{where}: rule for {syscall}: arg must be 0..5")
    matches: list[tuple[int, int]] = []
    if "any_bits" in item:
        bits = _get(item, "any_bits", int, where)
        unless = _get(item, "unless_bits", int, where, 0)
        matches += [(1 << b | unless, 1 << b) for b in range(64) if bits >> b & 1]
    if "equals_32" in item:
        matches.append((0xFFFFFFFF, _get(item, "equals_32", int, where)))
    if "masked_eq" in item:
        pair = _get(item, "masked_eq", list, where)
        if len(pair) != 2 or not all(isinstance(x, int) for x in pair):
            raise ProfileError(f"{where}: masked_eq must be [mask, value]")
        matches.append((pair[0], pair[1]))
    if not matches:
        raise ProfileError(f"{where}: rule for {syscall} has no condition")
    return SeccompRule(syscall, arg, tuple(matches))


def _errno(name: str, where: str) -> int:
    value = getattr(errno, name, None)
    if not isinstance(value, int):
        raise ProfileError(f"{where}: unknown errno {name!r}")
    return value


def _str_list(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _get(table, key, list, where, [])
    if not all(isinstance(x, str) for x in items):
        raise ProfileError(f"{where}: {key!r} must be a list of strings")
    return tuple(dict.fromkeys(items))


def parse_profile(name: str, path: Path, text: str) -> Profile:
    """Parse and validate a profile's TOML text. Errors name the file and the key."""
    where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{where}: {e}") from None
    if unknown := set(data) - {"description", "limits", "job", "rlimits", "seccomp"}:
        raise ProfileError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
    try:
        limits = Limits.from_dict(_get(data, "limits", dict, where))
    except SpecError as e:
        raise ProfileError(f"{where}: [limits]: {e}") from None
    if missing := limits.missing():
        raise ProfileError(f"{where}: [limits] must set {', '.join(missing)}")
    job = _get(data, "job", dict, where, {})
    uid = _get(job, "uid", int, where, 1000)
    gid = _get(job, "gid", int, where, 1000)
    if not (0 <= uid <= 65535 and 0 <= gid <= 65535):
        raise ProfileError(f"{where}: [job] uid and gid must be in 0..65535")
    workdir = _get(job, "workdir", str, where, "/work")
    if not workdir.startswith("/") or workdir == "/" or ".." in workdir.split("/"):
        raise ProfileError(f"{where}: [job] workdir must be an absolute path below /")
    rlimits: dict[str, tuple[int, int]] = {}
    for key, value in _get(data, "rlimits", dict, where, {}).items():
        if key not in _RLIMIT_NAMES:
            raise ProfileError(f"{where}: [rlimits] unknown limit {key!r}")
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int | str) for v in value)):
            raise ProfileError(f"{where}: [rlimits] {key} must be [soft, hard]")
        soft, hard = (v if isinstance(v, int) else parse_size(v) for v in value)
        rlimits[key] = (soft, hard)
    sec = _get(data, "seccomp", dict, where)
    default = _get(sec, "default", str, where, "allow")
    if default not in ("allow", "errno", "kill"):
        raise ProfileError(f"{where}: [seccomp] default must be allow, errno or kill")
    rules = tuple(_parse_rule(r, where) for r in _get(sec, "rule", list, where, []))
    policy = SeccompPolicy(
        default=default,
        errno=_errno(_get(sec, "errno", str, where, "EPERM"), where),
        deny=_str_list(sec, "deny", where),
        enosys=_str_list(sec, "enosys", where),
        allow=_str_list(sec, "allow", where),
        rules=rules,
    )
    if default == "allow" and policy.allow:
        raise ProfileError(f"{where}: [seccomp] 'allow' needs a default of errno or kill")
    return Profile(
        name=name, path=path, description=_get(data, "description", str, where, ""),
        limits=limits, uid=uid, gid=gid,
        hostname=_get(job, "hostname", str, where, "sandbox"),
        workdir=workdir,
        path_env=_get(job, "path", str, where, "/usr/local/bin:/usr/bin:/bin"),
        lang=_get(job, "lang", str, where, "C.UTF-8"),
        rlimits=rlimits, seccomp=policy,
        digest=hashlib.sha256(text.encode()).hexdigest(),
    )


def find_profile(name: str) -> Path:
    if not _NAME_RE.match(name):
        raise ProfileError(f"invalid profile name {name!r}")
    for directory in config.profile_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for d in config.profile_dirs() if d.is_dir()
                        for p in d.glob("*.toml")})
    raise ProfileError(f"unknown profile {name!r} (available: {', '.join(available) or 'none'})")


_cache: dict[Path, tuple[float, Profile]] = {}
# name -> (the candidate paths in search order, the one found, its mtime, the profile):
# every job loads its profile, and checking that a cached one is still the one that
# `find_profile` would pick takes a stat per candidate, not a walk of the search path.
_by_name: dict[tuple[str, str | None, str | None],
               tuple[tuple[str, ...], str, float, Profile]] = {}


def _still_valid(hit: tuple[tuple[str, ...], str, float, Profile]) -> bool:
    candidates, found, mtime, _ = hit
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return candidate == found and st.st_mtime == mtime and stat.S_ISREG(st.st_mode)
    return False


def load_profile(name: str) -> Profile:
    """Find ``NAME.toml`` on the profile path and parse it (cached until the file changes
    or another one takes its place)."""
    key = (name, os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))  # the search path
    if (hit := _by_name.get(key)) is not None and _still_valid(hit):
        return hit[3]
    path = find_profile(name)
    try:
        mtime = path.stat().st_mtime
        if (cached := _cache.get(path)) and cached[0] == mtime:
            profile = cached[1]
        else:
            profile = parse_profile(name, path, path.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    _cache[path] = (mtime, profile)
    candidates = tuple(str(d / f"{name}.toml") for d in config.profile_dirs())
    _by_name[key] = (candidates, str(path), mtime, profile)
    return profile


def list_profiles() -> list[Path]:
    seen: dict[str, Path] = {}
    for directory in config.profile_dirs():
        if directory.is_dir():
            for p in sorted(directory.glob("*.toml")):
                seen.setdefault(p.stem, p)
    return list(seen.values())
