"""Fuzzing (hypothesis) of everything that parses outside input: the layer unpacker (a
crafted image), the recipe parser (a crafted recipe), profiles, sizes, durations, image
references and job specs (what the daemon will decode from a client).

The property everywhere: the tool's own error type or a valid value; no other exception,
no hang (pytest-timeout and hypothesis deadlines), and for the unpacker no write, chmod or
creation outside the target.

The protocol decoder arrives with issue 3 (the daemon): fuzz it here the same way, with
garbage frames, truncated frames and oversized lengths, expecting `ProtocolError` only.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sandbox.errors import ImageError, ProfileError, SpecError
from sandbox.images import layers, recipe
from sandbox.images.store import normalize_ref
from sandbox.profiles import parse_profile
from sandbox.spec import JobSpec, Limits, parse_env
from sandbox.units import parse_seconds, parse_size

FUZZ = settings(max_examples=300, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ the layer unpacker

_NAMES = ["a", "b", "d", "d/e", "d/e/f", "a/b", ".wh.a", "d/.wh.e", "d/.wh..wh..opq",
          ".wh..wh..opq", "d/e/.wh..wh..opq", "..", "../x", "/abs", "./a", "a/../../x",
          "d//e", "x" * 300, "d/" + "y" * 250]
_KINDS = ["file", "dir", "sym", "hard", "fifo", "chr", "blk"]


def _outside_links(outside: str) -> list[str]:
    return [outside, f"{outside}/file", f"{outside}/sub", "../outside", "../../outside/sub",
            "a", "d", "d/e", "/etc", "."]


@st.composite
def tar_entries(draw: st.DrawFn, outside: str) -> list[dict[str, Any]]:
    entries = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(_KINDS))
        entries.append({
            "name": draw(st.sampled_from(_NAMES)),
            "kind": kind,
            "link": draw(st.sampled_from(_outside_links(outside))),
            "mode": draw(st.sampled_from([0o777, 0o755, 0o700, 0o000, 0o4755, 0o1777])),
            "data": draw(st.binary(max_size=64)),
        })
    return entries


def _tar(entries: list[dict[str, Any]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.mode = e["mode"]
            data = None
            if e["kind"] == "file":
                info.size = len(e["data"])
                data = io.BytesIO(e["data"])
            else:
                info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                             "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                             "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}[e["kind"]]
                info.linkname = e["link"]
                info.devmajor, info.devminor = (1, 3)
            tar.addfile(info, data)
    return out.getvalue()


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name
            st_ = p.lstat()
            content = p.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            out[str(p)] = (st_.st_mode, st_.st_uid, st_.st_ctime_ns, content)
    return out


@pytest.fixture(scope="module")
def arena() -> Any:
    """A scratch dir holding ``outside`` (must never change) next to each target."""
    base = Path(tempfile.mkdtemp(prefix="sbx-fuzz-"))
    outside = base / "outside"
    outside.mkdir(mode=0o700)
    (outside / "file").write_text("host\n")
    (outside / "file").chmod(0o600)
    (outside / "sub").mkdir(mode=0o700)
    yield base
    layers.remove_tree(base)


def _unpack_checked(arena: Path, blob: bytes, **kw: Any) -> None:
    outside = arena / "outside"
    before = _snapshot(outside)
    target = Path(tempfile.mkdtemp(dir=arena, prefix="t-"))
    try:
        layers.unpack(io.BytesIO(blob), target, **kw)
    except ImageError:
        pass
    else:
        for dirpath, dirnames, filenames in os.walk(target):
            for name in dirnames + filenames:
                st_ = (Path(dirpath) / name).lstat()
                assert not stat.S_ISBLK(st_.st_mode)
                assert not stat.S_ISCHR(st_.st_mode) or st_.st_rdev == 0  # whiteouts only
    finally:
        layers.remove_tree(target)
    assert _snapshot(outside) == before, "the unpacker changed something outside its target"


@FUZZ
@given(data=st.data())
def test_unpacker_never_writes_outside_and_fails_cleanly(arena: Path, data: st.DataObject) -> None:
    entries = data.draw(tar_entries(str(arena / "outside")))
    _unpack_checked(arena, _tar(entries))


@FUZZ
@given(data=st.data(), cut=st.integers(0, 4000), junk=st.binary(max_size=512),
       gz=st.booleans())
def test_unpacker_on_mangled_archives(arena: Path, data: st.DataObject, cut: int, junk: bytes,
                                      gz: bool) -> None:
    blob = _tar(data.draw(tar_entries(str(arena / "outside"))))
    blob = blob[:cut] + junk + blob[cut + len(junk):]
    _unpack_checked(arena, gzip.compress(blob) if gz else blob, max_bytes=1 << 16,
                    max_entries=64)


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_unpacker_on_random_bytes(arena: Path, blob: bytes) -> None:
    _unpack_checked(arena, blob)


@pytest.mark.parametrize("entries", [
    # a directory replaced by a symlink after its mode was recorded
    [("d", "dir", 0o777, ""), ("d", "sym", 0, "OUT")],
    # an opaque marker whose directory becomes a symlink
    [("d", "dir", 0o755, ""), ("d/.wh..wh..opq", "file", 0, ""), ("d", "sym", 0, "OUT")],
    # nested: the parent of a recorded directory becomes a symlink
    [("d", "dir", 0o755, ""), ("d/e", "dir", 0o777, ""), ("d", "sym", 0, "OUT")],
    [("d", "dir", 0o755, ""), ("d/e", "dir", 0o755, ""), ("d/e/.wh..wh..opq", "file", 0, ""),
     ("d", "sym", 0, "OUT")],
])
def test_unpacker_regressions(arena: Path, entries: list[tuple[str, str, int, str]]) -> None:
    out = str(arena / "outside")
    _unpack_checked(arena, _tar([{"name": n, "kind": k, "mode": m,
                                  "link": link.replace("OUT", out), "data": b""}
                                 for n, k, m, link in entries]))


# ------------------------------------------------------------------ recipes


_RECIPE_WORDS = st.sampled_from(
    ["FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "LABEL",
     "ARG", "from", "HEALTHCHECK", "busybox", "scratch", "debian:bookworm", "--chmod=755",
     "--from=x", "--", "[", "]", '["sh", "-c"]', '["a", 1]', "\\", "\n", "#", "$X", "${X}",
     "${X:-d}", "${", "K=V", 'K="a b"', "'", '"', "=", "/", "..", " ", "\t", "\r\n"])


@FUZZ
@given(words=st.lists(_RECIPE_WORDS, max_size=40), tail=st.text(max_size=80))
def test_recipe_parser(words: list[str], tail: str) -> None:
    text = " ".join(words) + tail
    try:
        instructions = recipe.parse(text, "Sandboxfile")
    except recipe.RecipeError as e:
        message = str(e)
        assert message.startswith("Sandboxfile:"), message
        return
    for ins in instructions:
        if ins.keyword in ("ENV", "LABEL"):
            with contextlib.suppress(recipe.RecipeError):
                recipe.parse_key_values(ins.text, "Sandboxfile", ins.line, ins.keyword)
        recipe.substitute(ins.text, {"X": "x"})


@FUZZ
@given(text=st.text(max_size=300))
def test_recipe_parser_on_any_text(text: str) -> None:
    with contextlib.suppress(recipe.RecipeError):
        recipe.parse(text, "R")
    recipe.substitute(text, {"A": "1"})


# ------------------------------------------------------------------ profiles

_TOML_VALUES = st.recursive(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.floats(allow_nan=False),
              st.sampled_from(["512M", "10", "1.5s", "EPERM", "ENOSYS", "allow", "errno",
                               "kill", "mount", "clone", "nosuchcall", "/work", "", "-1", "x"])),
    lambda inner: st.lists(inner, max_size=4), max_leaves=8)
_KEYS = st.sampled_from(["time", "wall_time", "memory", "pids", "output", "disk", "uid", "gid",
                         "hostname", "workdir", "path", "lang", "core", "nofile", "stack",
                         "default", "errno", "deny", "enosys", "allow", "syscall", "arg",
                         "any_bits", "unless_bits", "equals_32", "masked_eq", "bogus"])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return repr(v)


@st.composite
def profiles(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(st.sampled_from(["limits", "job", "rlimits", "seccomp",
                                                  "[seccomp.rule]", "extra"]),
                                 max_size=6, unique=True)):
        lines.append(f"[{section}]")
        for key, value in draw(st.dictionaries(_KEYS, _TOML_VALUES, max_size=6)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(text=profiles())
def test_profile_parser(text: str) -> None:
    from sandbox import seccomp

    try:
        profile = parse_profile("fuzz", Path("fuzz.toml"), text)
    except ProfileError:
        return
    with contextlib.suppress(ProfileError):
        seccomp.compile_bpf(profile.seccomp)


@FUZZ
@given(text=st.text(max_size=200))
def test_profile_parser_on_any_text(text: str) -> None:
    with pytest.raises(ProfileError):
        parse_profile("fuzz", Path("fuzz.toml"), text)


# ------------------------------------------------------------------ sizes, durations, refs


@FUZZ
@given(value=st.one_of(st.text(max_size=40), st.from_regex(
    r"\s*\d{1,400}(\.\d*)?\s*[kmgtKMGT]?i?[bB]?\s*", fullmatch=True)))
@example("9" * 400)
@example("99999999999T")
def test_parse_size(value: str) -> None:
    try:
        size = parse_size(value)
    except SpecError:
        return
    assert isinstance(size, int) and size >= 0


@FUZZ
@given(value=st.one_of(st.text(max_size=40), st.floats(), st.integers(),
                       st.from_regex(r"\d{1,400}(\.\d*)?(e\d{1,4})?(ms|s)?", fullmatch=True)))
@example([])
@example("9" * 400)
def test_parse_seconds(value: Any) -> None:
    try:
        seconds = parse_seconds(value)
    except SpecError:
        return
    assert isinstance(seconds, float) and 0 < seconds < float("inf")


@FUZZ
@given(ref=st.text(max_size=80))
def test_image_references(ref: str) -> None:
    with contextlib.suppress(ImageError):
        normalize_ref(ref)


@FUZZ
@given(items=st.lists(st.text(max_size=20), max_size=5))
def test_parse_env(items: list[str]) -> None:
    try:
        env = parse_env(items)
    except SpecError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())


_ANY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
              st.binary(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10)


@st.composite
def job_dicts(draw: st.DrawFn) -> dict[str, Any]:
    keys = ["image", "argv", "files", "stdin", "env", "limits", "profile", "entrypoint"]
    good: dict[str, Any] = {"image": "busybox", "argv": ["true"], "files": [], "stdin": None,
                            "env": {}, "limits": {}, "profile": "default", "entrypoint": False}
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        good[key] = draw(_ANY_JSON)
    if draw(st.booleans()):
        good["limits"] = draw(st.dictionaries(st.sampled_from(
            ["time", "wall_time", "memory", "pids", "output", "disk", "x"]), _ANY_JSON,
            max_size=3))
    if draw(st.booleans()):
        good["files"] = draw(st.lists(st.dictionaries(st.sampled_from(
            ["name", "data", "mode", "x"]), _ANY_JSON, max_size=3), max_size=2))
    return good


@FUZZ
@given(data=job_dicts())
def test_job_spec_from_any_dict(data: dict[str, Any]) -> None:
    """What the daemon will decode from a client: a valid, well-typed spec or `SpecError`."""
    try:
        spec = JobSpec.from_dict(data)
    except SpecError:
        return
    assert isinstance(spec.image, str) and spec.image
    assert all(isinstance(a, str) for a in spec.argv)
    assert spec.stdin is None or isinstance(spec.stdin, bytes)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec.env.items())
    assert isinstance(spec.profile, str) and isinstance(spec.entrypoint, bool)
    for f in spec.files:
        assert isinstance(f.data, bytes) and isinstance(f.mode, int)
    assert isinstance(spec.limits, Limits)
    JobSpec.from_dict(spec.to_dict())  # round trip
