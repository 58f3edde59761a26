"""Retry delays double from half a second, stop at the cap, and jitter only ever shortens them by half."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.outbox.backoff import Backoff, backoff_seconds


@pytest.mark.parametrize(("failures", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (500, 30.0)])
def test_delay_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_seconds(failures, cap=30.0, jitter=0.0) == expected


@given(failures=st.integers(1, 10_000), cap=st.floats(0.01, 3600), jitter=st.floats(0, 1, exclude_max=True))
def test_delay_stays_between_half_the_nominal_value_and_the_cap(failures: int, cap: float, jitter: float) -> None:
    delay = backoff_seconds(failures, cap=cap, jitter=jitter)
    assert min(cap, 0.5) / 2 <= delay <= cap


def test_success_resets_the_delay() -> None:
    backoff = Backoff(cap=0.2, rng=random.Random(1))
    delays = [backoff.failed() for _ in range(5)]
    assert all(0.1 <= d <= 0.2 for d in delays)
    backoff.succeeded()
    assert backoff.failures == 0
