"""The host half of the PROGRAM rule (sandbox/hostfiles.py), on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.errors import SpecError
from sandbox.hostfiles import job_program


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.py").write_text("print(1)\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "d" / "t.sh", 0o755)
    return tmp_path


def test_a_relative_host_file_is_copied_and_named(cwd: Path) -> None:
    got = job_program("d/t.sh", ["a"], [])
    assert got["argv"] == ["t.sh", "a"] and got["entrypoint"] and not got["host_path"]
    assert [(f["name"], f["mode"]) for f in got["files"]] == [("t.sh", 0o755)]


def test_an_absolute_host_file_is_sent_and_marked(cwd: Path) -> None:
    path = str(cwd / "s.py")
    got = job_program(path, [], [])
    assert got["argv"] == [path] and got["entrypoint"] and got["host_path"] == path
    assert [f["name"] for f in got["files"]] == ["s.py"]


def test_an_absolute_path_that_is_no_file_here_is_left_to_the_image(cwd: Path) -> None:
    got = job_program("/no/such/prog", [], [])
    assert got == {"argv": ["/no/such/prog"], "files": [], "entrypoint": False,
                   "host_path": "/no/such/prog"}


def test_a_bare_name_that_is_no_file_here_is_a_command(cwd: Path) -> None:
    got = job_program("ls", ["-l"], [])
    assert got == {"argv": ["ls", "-l"], "files": [], "entrypoint": False, "host_path": ""}


def test_a_missing_relative_path_is_an_error(cwd: Path) -> None:
    with pytest.raises(SpecError, match=r"\./nope\.py: no such file on this machine"):
        job_program("./nope.py", [], [])


def test_file_and_program_naming_the_same_file_are_one(cwd: Path) -> None:
    got = job_program("./s.py", [], ["s.py"])
    assert [f["name"] for f in got["files"]] == ["s.py"] and got["argv"] == ["s.py"]
    got = job_program("./t.sh", [], ["d/t.sh"])  # ./t.sh names the --file
    assert got["argv"] == ["t.sh"] and [f["name"] for f in got["files"]] == ["t.sh"]


def test_two_files_of_one_name_are_refused(cwd: Path) -> None:
    (cwd / "t.sh").write_text("other\n")
    with pytest.raises(SpecError, match=r"another file named 't\.sh'"):
        job_program("t.sh", [], ["d/t.sh"])


def test_the_script_comes_first(cwd: Path) -> None:
    got = job_program("s.py", [], ["d/t.sh"])
    assert [f["name"] for f in got["files"]] == ["s.py", "t.sh"]
