"""Run ids: sortable by start time, unique, and recognisable (other names in the runs tree are ignored)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from host_agent.runs.layout import is_run_id, new_run_id

MOMENTS = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC))


def test_the_shape_is_utc_seconds_then_a_six_character_suffix() -> None:
    run_id = new_run_id(datetime(2026, 11, 27, 19, 26, 46, 123456, tzinfo=UTC))
    assert run_id.startswith("20261127T192646Z-123") and len(run_id) == 23 and is_run_id(run_id)


@given(MOMENTS, st.integers(min_value=1, max_value=10**7))
def test_a_later_start_sorts_later(first: datetime, microseconds_later: int) -> None:
    later = first + timedelta(microseconds=microseconds_later)
    if later.replace(microsecond=later.microsecond // 1000 * 1000) == first.replace(microsecond=first.microsecond // 1000 * 1000):
        return  # the same millisecond: order is not promised, uniqueness is
    assert new_run_id(first) < new_run_id(later)


def test_names_that_are_not_run_ids_are_recognised() -> None:
    for name in (
        "",
        "latest",
        "20261127T192646Z",
        "20261127T192646Z-12345",
        "20261127X192646Z-123abc",
        "2026112YT192646Z-123abc",
    ):
        assert not is_run_id(name), name
