from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.profile import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("30s", 30),
        ("15m", 900),
        ("4h", 14_400),
        ("7d", 604_800),
        ("4h30m", 16_200),
        ("1d12h", 129_600),
        ("1d2h3m4s", 93_784),
        (" 2h ", 7_200),
    ],
)
def test_parses_simple_and_compound_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not a duration"),
        ("4", "not a duration"),
        ("4x", "not a duration"),
        ("h4", "not a duration"),
        ("-1h", "not a duration"),
        ("1.5h", "not a duration"),
        ("30m4h", "largest first"),
        ("1h1h", "largest first"),
        ("4 h", "not a duration"),
    ],
)
def test_rejects_malformed_durations_with_the_fix(text: str, complaint: str) -> None:
    with pytest.raises(DurationError, match=complaint) as caught:
        parse_duration(text)
    assert "4h30m" in str(caught.value)


def test_rejects_non_strings() -> None:
    with pytest.raises(DurationError, match="quoted duration"):
        parse_duration(3600)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10 * 365 * 86_400))
def test_format_and_parse_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
