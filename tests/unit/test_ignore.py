""".dockerignore patterns, checked against the examples of Docker's documentation
(https://docs.docker.com/build/concepts/context/#dockerignore-files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.images.ignore import Ignore


@pytest.mark.parametrize(("pattern", "path", "ignored"), [
    ("*/temp*", "somedir/temporary.txt", True),
    ("*/temp*", "somedir/temp", True),
    ("*/temp*", "temp", False),
    ("*/temp*", "a/b/temp", False),
    ("*/*/temp*", "somedir/subdir/temporary.txt", True),
    ("*/*/temp*", "somedir/temporary.txt", False),
    ("temp?", "tempa", True),
    ("temp?", "tempab", False),
    ("temp?", "dir/tempa", False),
    ("**/*.go", "main.go", True),
    ("**/*.go", "a/b/c.go", True),
    ("**/*.go", "a/b/c.goo", False),
    ("/build", "build/out.o", True),  # a directory's pattern covers what is in it
    ("build/", "build/x", True),
    ("./notes.txt", "notes.txt", True),
    ("[ab].txt", "a.txt", True),
    ("[!ab].txt", "a.txt", False),
    ("[!ab].txt", "c.txt", True),
    ("\\*.txt", "*.txt", True),
    ("\\*.txt", "x.txt", False),
])
def test_one_pattern(pattern: str, path: str, ignored: bool) -> None:
    assert Ignore([pattern]).ignored(path) is ignored


def test_exceptions_and_the_last_match_wins() -> None:
    rules = Ignore(["# a comment", "", "*.md", "!README.md"])
    assert rules.ignored("CHANGES.md") and not rules.ignored("README.md")
    rules = Ignore(["*.md", "!README*.md", "README-secret.md"])
    assert rules.ignored("README-secret.md") and not rules.ignored("README-public.md")
    rules = Ignore(["*.md", "README-secret.md", "!README*.md"])
    assert not rules.ignored("README-secret.md")


def test_sandboxignore_wins_over_dockerignore(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("a\n")
    assert Ignore.of(tmp_path).ignored("a")
    (tmp_path / ".sandboxignore").write_text("b\n")
    assert Ignore.of(tmp_path).ignored("b") and not Ignore.of(tmp_path).ignored("a")
    assert not Ignore.of(tmp_path / "nowhere").ignored("a")
