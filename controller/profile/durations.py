"""Durations as operators write them: `30s`, `15m`, `4h`, `7d`, and compounds such as `1d12h` or `4h30m`.

One parser serves every consumer (validation, the compiler, TTL schedules, idle detection), so a
duration that validates is a duration that works everywhere; the original tool validated `7d` but then
silently ignored it when scheduling.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([dhms])")
_WHOLE = re.compile(r"(?:\d+[dhms])+")

DURATION_HELP = "write a duration such as 30s, 15m, 4h, 7d or 4h30m (units d, h, m, s, largest first)"


class DurationError(ValueError):
    """The text is not a duration km understands; the message says how to write one."""


def parse_duration(text: str) -> int:
    """Return the duration in seconds. `"0"` is zero; every other form needs a unit."""
    if not isinstance(text, str):
        raise DurationError(f"expected a quoted duration string, got {type(text).__name__}; {DURATION_HELP}")
    value = text.strip()
    if value == "0":
        return 0
    if not _WHOLE.fullmatch(value):
        raise DurationError(f"{text!r} is not a duration; {DURATION_HELP}")
    parts = _PART.findall(value)
    units = [unit for _, unit in parts]
    order = [unit for unit in _UNIT_SECONDS if unit in units]
    if units != order:
        raise DurationError(f"{text!r}: each unit at most once, largest first (e.g. 1d4h30m); {DURATION_HELP}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: int) -> str:
    """The canonical compound spelling of `seconds` (the inverse of `parse_duration`)."""
    if seconds < 0:
        raise DurationError("a duration cannot be negative")
    if seconds == 0:
        return "0"
    text = ""
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            text += f"{count}{unit}"
    return text
