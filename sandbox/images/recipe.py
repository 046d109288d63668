"""Parse a Sandboxfile (a Dockerfile subset) into instructions. Pure: no I/O.

Supported: FROM, RUN, COPY, ADD, ENV, WORKDIR, USER, ENTRYPOINT, CMD, LABEL, ARG; comments,
line continuations, exec (JSON) and shell forms, ``--flag=value`` options. Anything else is
an error naming the line.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from ..errors import ImageError

KEYWORDS = ("FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "ENTRYPOINT", "CMD",
            "LABEL", "ARG")
# The ``--flags`` each instruction accepts (FROM's are mmdebstrap's, for ``debian:SUITE``).
FLAGS: dict[str, tuple[str, ...]] = {
    "FROM": ("variant", "include", "components", "mirror"),
    "RUN": ("network",),
    "COPY": ("chmod",),
    "ADD": ("chmod",),
}
_FLAG_HINTS = {
    "from": "multi-stage builds are not supported",
    "chown": "layers do not keep file ownership",
    "mount": "RUN mounts are not supported",
}
NETWORK_MODES = ("default", "none", "host")
_FLAG_RE = re.compile(r"^--([a-z][a-z0-9-]*)(?:=(.*))?$")


@dataclass(frozen=True, slots=True)
class Instruction:
    line: int
    keyword: str
    text: str                                   # the arguments as written (after flags)
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None          # for RUN/CMD/ENTRYPOINT/COPY in JSON form

    @property
    def source(self) -> str:
        flags = " ".join(f"--{k}={v}" if v else f"--{k}" for k, v in self.flags.items())
        return " ".join(p for p in (self.keyword, flags, self.text) if p)


class RecipeError(ImageError):
    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buf:
            start = number
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        out.append((start, " ".join(part.strip() for part in buf).strip()))
        buf = []
    if buf:
        out.append((start, " ".join(part.strip() for part in buf).strip()))
    return out


def _split_flags(rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        word, _, tail = rest.partition(" ")
        m = _FLAG_RE.match(word)
        if not m:
            break
        flags[m.group(1)] = m.group(2) or ""
        rest = tail.lstrip()
    return flags, rest


def _check_flags(keyword: str, flags: dict[str, str], path: str, line: int) -> None:
    for flag, setting in flags.items():
        if flag not in FLAGS.get(keyword, ()):
            hint = _FLAG_HINTS.get(flag)
            raise RecipeError(path, line, f"{keyword} --{flag} is not supported"
                              + (f" ({hint})" if hint else ""))
        if flag == "network" and setting not in NETWORK_MODES:
            raise RecipeError(path, line, f"RUN --network={setting}: expected one of "
                              f"{', '.join(NETWORK_MODES)}")
        if flag == "chmod" and not re.fullmatch(r"[0-7]{3,4}", setting):
            raise RecipeError(path, line, f"{keyword} --chmod={setting}: expected an octal "
                              "mode such as 755")


def parse(text: str, path: str = "Sandboxfile") -> list[Instruction]:
    """Instructions of a recipe, validated for shape (not yet for meaning)."""
    instructions: list[Instruction] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        if keyword not in KEYWORDS:
            raise RecipeError(path, line, f"unsupported instruction {keyword!r} "
                              f"(supported: {', '.join(KEYWORDS)})")
        flags, rest = _split_flags(rest.strip())
        _check_flags(keyword, flags, path, line)
        exec_form = None
        if keyword in ("RUN", "CMD", "ENTRYPOINT", "COPY", "ADD") and rest.startswith("["):
            try:
                value = json.loads(rest)
            except ValueError:
                value = None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecipeError(path, line, f"{keyword}: malformed JSON array")
            exec_form = value
        if not rest and keyword not in ("CMD", "ENTRYPOINT"):
            raise RecipeError(path, line, f"{keyword} needs arguments")
        instructions.append(Instruction(line, keyword, rest, flags, exec_form))
    if not instructions or instructions[0].keyword not in ("FROM", "ARG"):
        raise RecipeError(path, instructions[0].line if instructions else 1,
                          "a recipe must start with FROM")
    return instructions


def parse_key_values(text: str, path: str, line: int, keyword: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (or the legacy ``K V`` form of ENV/LABEL)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise RecipeError(path, line, f"{keyword}: {e}") from None
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise RecipeError(path, line, f"{keyword}: expected KEY=VALUE")
        return {words[0]: " ".join(words[1:])}
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise RecipeError(path, line, f"{keyword}: expected KEY=VALUE, got {word!r}")
        out[key] = value
    return out


_VAR_RE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::-(?P<default>[^}]*))?\}"
                     r"|(?P<bare>[A-Za-z_]\w*))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` expansion, as in Dockerfiles."""

    def repl(m: re.Match[str]) -> str:
        value = variables.get(m.group("braced") or m.group("bare"), "")
        if not value and m.group("default") is not None:
            return m.group("default")
        return value

    return _VAR_RE.sub(repl, text)
