"""Pure parts: sizes, durations, limits, specs and results."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.errors import SpecError
from sandbox.spec import File, JobSpec, Limits, Result, Status, parse_env
from sandbox.units import parse_seconds, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("512", 512), ("64K", 65536), ("64k", 65536), ("256M", 256 << 20), ("1G", 1 << 30),
    ("1.5G", int(1.5 * (1 << 30))), ("2GiB", 2 << 30), ("10MB", 10 << 20), (4096, 4096),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1X", "1.2.3M", "M", "1 0M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [("2", 2.0), ("0.5", 0.5), ("1.5s", 1.5),
                                                ("500ms", 0.5), (3, 3.0)])
def test_parse_seconds(text: str | int, expected: float) -> None:
    assert parse_seconds(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "soon", ""])
def test_parse_seconds_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_seconds(text)


@given(st.text(max_size=20))
def test_parse_size_never_crashes(text: str) -> None:
    with contextlib.suppress(SpecError):
        assert parse_size(text) >= 0


def test_limits_accept_strings_and_fill_from_base() -> None:
    limits = Limits(time="1.5s", memory="256M")  # type: ignore[arg-type]
    base = Limits(time=10, wall_time=30, memory=1 << 30, pids=64, output=1 << 20, disk=1 << 26)
    merged = limits.over(base)
    assert (merged.time, merged.memory, merged.pids) == (1.5, 256 << 20, 64)
    assert not merged.missing()
    with pytest.raises(SpecError):
        Limits(pids=0)
    with pytest.raises(SpecError):
        Limits(memory="1K")  # type: ignore[arg-type]


def test_jobspec_validation_and_round_trip() -> None:
    # lists on purpose: the constructor must normalise them to the tuples from_dict makes
    spec = JobSpec(image="py3", argv=["python3", "x.py"],  # type: ignore[arg-type]
                   files=[File(name="x.py", data=b"1")],  # type: ignore[arg-type]
                   env={"A": "1"}, limits=Limits(time=1))
    assert JobSpec.from_dict(spec.to_dict()) == spec
    bad: dict[str, Any]  # deliberately ill-typed arguments
    for bad in (dict(argv="python3"), dict(argv=[]), dict(argv=["a\0b"]),
                dict(argv=["x"], env={"1A": "x"}), dict(argv=["x"], profile="../etc")):
        with pytest.raises(SpecError):
            JobSpec(image="py3", **bad)
    for name in ("../x", "/etc/passwd", "a/../../b", "", "."):
        with pytest.raises(SpecError):
            File(name=name, data=b"")


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(SpecError):
        parse_env(["NOEQUALS"])


def test_result_exit_codes_and_json() -> None:
    assert Result(status=Status.OK, exit_code=0).cli_exit_code == 0
    assert Result(status=Status.NONZERO_EXIT, exit_code=3).cli_exit_code == 3
    assert Result(status=Status.SIGNALED, signal=11).cli_exit_code == 139
    assert Result(status=Status.TIME_LIMIT, signal=9).cli_exit_code == 137
    assert Result(status=Status.INTERNAL_ERROR, message="x").cli_exit_code == 125
    assert Result(status=Status.TIME_LIMIT, exit_code=0).cli_exit_code == 1
    r = Result(status=Status.OK, exit_code=0, stdout=b"\xff ok", stderr=b"text")
    shown = r.to_json()  # output that is not UTF-8 comes as base64, and says so
    assert (shown["stdout"], shown["stdout_encoding"]) == ("/yBvaw==", "base64")
    assert (shown["stderr"], shown["stderr_encoding"]) == ("text", "utf-8")
    assert Result.from_dict(r.to_dict()) == r
