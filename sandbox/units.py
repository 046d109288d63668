"""Sizes and durations as users write them (``256M``, ``1.5s``). Stdlib only and cheap to
import: the CLI's fast path uses it."""

from __future__ import annotations

import math
import re

from .errors import SpecError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = (1 << 63) - 1  # what the kernel's 64-bit counters take


def parse_size(value: str | int) -> int:
    """Parse a size such as ``512``, ``64K``, ``256M``, ``1.5G`` or ``2GiB`` into bytes."""
    if isinstance(value, bool):
        raise SpecError(f"invalid size {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise SpecError(f"invalid size {value}: must be between 0 and {MAX_SIZE}")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise SpecError(f"invalid size {value!r}: expected a number with an optional K, M or G")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not size <= MAX_SIZE:  # also catches inf
        raise SpecError(f"invalid size {value!r}: too large")
    return int(size)


def parse_seconds(value: str | float | int) -> float:
    """Parse a duration in seconds: ``2``, ``0.5``, ``1.5s``, ``500ms``."""
    if isinstance(value, bool):
        raise SpecError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif not isinstance(value, str):
        raise SpecError(f"invalid duration {value!r}: expected seconds, e.g. 2 or 0.5")
    else:
        text = value.strip().lower()
        scale = 1.0
        if text.endswith("ms"):
            text, scale = text[:-2], 0.001
        elif text.endswith("s"):
            text = text[:-1]
        try:
            seconds = float(text) * scale
        except ValueError:
            raise SpecError(
                f"invalid duration {value!r}: expected seconds, e.g. 2 or 0.5") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(f"invalid duration {value!r}: must be a positive number of seconds")
    return seconds


def format_size(n: int) -> str:
    """Render bytes compactly (``256M``)."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)
