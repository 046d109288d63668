"""The fast path of `sandbox exec` accepts exactly what the full CLI accepts, or defers."""

from __future__ import annotations

from sandbox import _fastexec
from sandbox.cli import exec_cmd


def test_same_options_as_the_click_command() -> None:
    click_options = {opt for p in exec_cmd.params for opt in p.opts if opt.startswith("-")}
    assert set(_fastexec.OPTIONS) == click_options


def test_parse() -> None:
    opts = _fastexec.parse(["--image=busybox", "--time", "1.5", "--memory", "64M", "--env",
                            "A=1", "--json", "sh", "-c", "echo --time"])
    assert opts is not None
    assert (opts["image"], opts["time"], opts["memory"], opts["env"], opts["json"]) == (
        "busybox", 1.5, 64 << 20, ["A=1"], True)
    assert opts["argv"] == ["sh", "-c", "echo --time"]


def test_defers_to_the_full_cli() -> None:
    for argv in (["--help"], ["--memory", "lots", "x"], ["--pids", "0", "x"], ["--env", "NOEQ",
                 "x"], ["--image"], [], ["--json=yes", "x"], ["--no-such", "x"], ["-i", "cat"],
                 ["--stdin", "-", "cat"]):
        assert _fastexec.parse(argv) is None, argv


def test_speaks_the_protocol_version() -> None:
    from sandbox.protocol import PROTOCOL_VERSION

    assert _fastexec.PROTOCOL_VERSION == PROTOCOL_VERSION


def test_imports_nothing_heavy() -> None:
    """The point of the fast path: no click, trio, dataclasses, typing, contextlib (nor the
    functools it brings) at start-up."""
    import subprocess
    import sys

    code = ("import sys, sandbox._fastexec; "
            "print(' '.join(m for m in ('click', 'trio', 'dataclasses', 'typing', 'rich', "
            "'contextlib', 'functools') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
