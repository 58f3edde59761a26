"""Consecutive SSL calls moving one message become one reported event.

A download is thousands of SSL_read calls, and each exported record costs the daemon a few hundred
microseconds of Python (benchmarks/telemetry_export.py). The kernel still sees every call and the
counters count every call; what is exported is one event per connection, direction and message: calls
are merged until the other direction speaks, a chunk starts a new HTTP message, the connection goes
quiet, or a second has passed. The merged event keeps the first call's time, HTTP fields and payload,
and says how many calls and bytes it stands for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

QUIET_SECONDS = 0.2
MAX_SPAN_SECONDS = 1.0

Key = tuple[int, int, str]  # pid, connection, direction


@dataclass
class TlsReport:
    """What SandboxEvents.tls is given: the keyword arguments of one exported event."""

    time: float
    pid: int
    process: str
    direction: str
    size: int
    peer: tuple[str, int] | None
    http: Mapping[str, str | int] | None
    payload: bytes | None
    calls: int = 1
    last: float = field(default=0.0, repr=False)


class Coalescer:
    def __init__(self) -> None:
        self._pending: dict[Key, TlsReport] = {}

    def add(self, report: TlsReport, connection: int) -> list[TlsReport]:
        """Take one call; returns the reports it completed (oldest first)."""
        key = (report.pid, connection, report.direction)
        other = (report.pid, connection, "read" if report.direction == "write" else "write")
        done = [self._pending.pop(other)] if other in self._pending else []
        pending = self._pending.get(key)
        report.last = report.time
        if pending is not None and report.http is None and report.time - pending.time < MAX_SPAN_SECONDS:
            pending.size += report.size
            pending.calls += 1
            pending.last = report.time
            pending.peer = pending.peer or report.peer
            return done
        if pending is not None:
            done.append(self._pending.pop(key))
        self._pending[key] = report
        return done

    def due(self, now: float) -> list[TlsReport]:
        """Reports whose connection went quiet, or that have been open too long."""
        ready = [
            key
            for key, pending in self._pending.items()
            if now - pending.last >= QUIET_SECONDS or now - pending.time >= MAX_SPAN_SECONDS
        ]
        return sorted((self._pending.pop(key) for key in ready), key=lambda report: report.time)

    def drain(self) -> list[TlsReport]:
        """Everything still open (the capture is stopping)."""
        reports, self._pending = sorted(self._pending.values(), key=lambda report: report.time), {}
        return reports
