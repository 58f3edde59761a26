"""Waiting for AWS to finish something, with a deadline: look first, then sleep between looks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from controller.substrates.ec2.errors import Ec2Error

T = TypeVar("T")


@dataclass(frozen=True)
class Polling:
    """How often to look and how long to wait before giving up."""

    interval_seconds: float = 2.0
    timeout_seconds: float = 300.0


DEFAULT_POLLING = Polling()


def wait_for(check: Callable[[], T | None], what: str, polling: Polling = DEFAULT_POLLING) -> T:
    """Call `check` until it returns something other than None; `Ec2Error` naming `what` at the deadline."""
    deadline = time.monotonic() + polling.timeout_seconds
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise Ec2Error(f"timed out after {polling.timeout_seconds:g}s waiting for {what}")
        time.sleep(polling.interval_seconds)
