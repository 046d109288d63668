"""``.dockerignore`` (or ``.sandboxignore``, which wins): what COPY and ADD leave out of the
build context, with Docker's pattern syntax.

One pattern per line, relative to the context's root (a leading ``/`` is dropped, the path
cleaned); ``#`` starts a comment line; ``*`` matches any run of characters but ``/``, ``?``
one such character, ``[...]`` a class (``[^...]``/``[!...]`` negated), ``\\`` escapes; ``**``
matches any number of directories (none included). A line starting with ``!`` is an
exception: it includes again what earlier lines excluded. The last line that matches a path
decides, and a pattern that matches a directory matches everything below it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

FILES = (".sandboxignore", ".dockerignore")


@dataclass(frozen=True, slots=True)
class Rule:
    regex: re.Pattern[str]
    exception: bool


class Ignore:
    """The rules of a context's ignore file; ``Ignore([])`` ignores nothing."""

    def __init__(self, lines: list[str]) -> None:
        self.rules: list[Rule] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if exception else line).lstrip("/")
            if pattern in ("", "."):
                continue
            self.rules.append(Rule(re.compile(_regex(pattern)), exception))

    @classmethod
    def of(cls, context: Path) -> Ignore:
        for name in FILES:
            path = context / name
            if path.is_file() and not path.is_symlink():
                return cls(path.read_text(errors="replace").splitlines())
        return cls([])

    def ignored(self, rel: str) -> bool:
        """Is ``rel`` (a path relative to the context, ``/``-separated) left out?"""
        rel = posixpath.normpath(rel).lstrip("/")
        if not self.rules or rel in ("", "."):
            return False
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        verdict = False
        for rule in self.rules:
            if any(rule.regex.fullmatch(p) for p in prefixes):
                verdict = not rule.exception
        return verdict


def _regex(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/": any number of directories, even none
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
