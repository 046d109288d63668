"""Where the runtime state lives: a function of the uid, not of the environment."""

from __future__ import annotations

import os

import pytest

from sandbox import runtime


@pytest.mark.parametrize("xdg", [None, "/run/user/12345", "/somewhere/else"])
def test_the_socket_does_not_depend_on_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch,
                                                       xdg: str | None) -> None:
    monkeypatch.delenv("SANDBOX_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    expected = runtime.socket_path()
    if xdg is not None:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert runtime.socket_path() == expected == runtime.default_socket_path()


def test_roots_runtime_dir_is_in_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert runtime.runtime_dir_path() == "/run/sandbox"


def test_a_user_without_run_user_gets_a_dir_in_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    uid = 4242424
    monkeypatch.setattr(os, "getuid", lambda: uid)
    assert runtime.runtime_dir_path() == f"/tmp/sandbox-{uid}"  # no /run/user/UID here


def test_sandbox_socket_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_SOCKET", "/x/y.sock")
    assert runtime.socket_path() == "/x/y.sock"
