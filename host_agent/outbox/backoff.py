"""How long to wait after consecutive failures: exponential, capped, and jittered.

Jitter keeps many sandboxes that lost the same store from retrying in lockstep when it returns; the
delay never drops below half its nominal value, so a down store is not hammered.
"""

from __future__ import annotations

import random

INITIAL_SECONDS = 0.5


def backoff_seconds(failures: int, cap: float, jitter: float, initial: float = INITIAL_SECONDS) -> float:
    """The wait after `failures` (>= 1) consecutive failures; `jitter` in [0, 1) picks within [half, full]."""
    nominal = min(cap, initial * 2.0 ** min(failures - 1, 62))
    return nominal * (1 - jitter / 2)


class Backoff:
    """Consecutive-failure counter for one uploader."""

    def __init__(self, cap: float, rng: random.Random | None = None) -> None:
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def failed(self) -> float:
        self.failures += 1
        return backoff_seconds(self.failures, self.cap, self._rng.random(), initial=min(INITIAL_SECONDS, self.cap))

    def succeeded(self) -> None:
        self.failures = 0
