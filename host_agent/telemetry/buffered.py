"""Events reported before telemetry is up are kept, then handed over in order.

The OpenTelemetry SDK and protobuf take about 0.35 s to import, which would add a third to a local
sandbox's create time if the daemon waited for them before telling systemd it is ready. So the daemon
reports ready first and starts telemetry beside it; the gate and the capture report to this buffer from
the start, and nothing they saw in between is lost (up to a bound, beyond which drops are counted).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host_agent.telemetry.events import SandboxEvents

MAX_BUFFERED = 10_000


class BufferedEvents:
    """The reporting interface of SandboxEvents; buffers until `attach()`, then passes straight through."""

    def __init__(self, limit: int = MAX_BUFFERED) -> None:
        self.limit = limit
        self.dropped = 0
        self._target: SandboxEvents | None = None
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def attach(self, target: SandboxEvents) -> None:
        """Replay what was buffered into `target`, oldest first; later events go to it directly."""
        with self._lock:
            pending, self._pending = self._pending, []
            for method, arguments in pending:
                getattr(target, method)(**arguments)
            self._target = target

    @property
    def attached(self) -> bool:
        return self._target is not None

    def dns(self, *, name: str, qtype: str, decision: str, rcode: str, addresses: Sequence[str]) -> None:
        self._report("dns", name=name, qtype=qtype, decision=decision, rcode=rcode, addresses=list(addresses))

    def gate(self, *, decision: str, address: str, port: int, protocol: str, pid: int, process: str) -> None:
        self._report("gate", decision=decision, address=address, port=port, protocol=protocol, pid=pid, process=process)

    def tls(
        self,
        *,
        time: float,
        pid: int,
        process: str,
        direction: str,
        size: int,
        peer: tuple[str, int] | None,
        http: Mapping[str, str | int] | None,
        payload: bytes | None,
        calls: int = 1,
    ) -> None:
        self._report(
            "tls",
            time=time,
            pid=pid,
            process=process,
            direction=direction,
            size=size,
            peer=peer,
            http=http,
            payload=payload,
            calls=calls,
        )

    def tls_unobserved(self, *, pid: int, process: str, exe: str, reason: str) -> None:
        self._report("tls_unobserved", pid=pid, process=process, exe=exe, reason=reason)

    def _report(self, method: str, **arguments: Any) -> None:
        target = self._target
        if target is None:
            with self._lock:
                target = self._target
                if target is None:
                    if len(self._pending) < self.limit:
                        self._pending.append((method, arguments))
                    else:
                        self.dropped += 1
                    return
        getattr(target, method)(**arguments)
