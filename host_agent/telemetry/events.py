"""What the host agent reports about the sandbox, as OpenTelemetry log records and counters.

Every record carries `event.name` (`dns`, `gate`, `tls`, `tls_unobserved`, `agent_run`), which is what
`km otel` sorts into its timeline; the fields are flat attributes so a collector can index them. DNS
answers are remembered (address → name, bounded) so gate and TLS events can name the host an address
belongs to, which is what an operator reads, rather than only the address.

Emitting never raises into the caller: telemetry must not stop enforcement.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry._logs import SeverityNumber
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.util.types import AttributeValue

from host_agent.telemetry.pipeline import Telemetry

log = logging.getLogger("km-host-agent.telemetry")

NAMES_REMEMBERED = 8192
PAYLOAD_ENCODING_ERRORS = "backslashreplace"  # plaintext that is not UTF-8 stays readable and lossless


class SandboxEvents:
    """The daemon's reporter: one per daemon, shared by the gatekeeper, the capture and the run watcher."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._names: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # Counts kept as plain numbers and read by the SDK at collection time: a synchronous SDK
        # counter costs about 50 µs per add, more than the log record itself.
        self._tallies: dict[str, Counter[tuple[tuple[str, str], ...]]] = {}
        for name, unit, description in (
            ("km.dns.queries", "1", "DNS queries answered, by decision"),
            ("km.gate.decisions", "1", "Egress denials reported by the gate"),
            ("km.tls.calls", "1", "SSL_read/SSL_write calls captured"),
            ("km.tls.bytes", "By", "Plaintext bytes moved by them"),
            ("km.agent.runs", "1", "Agent runs ended, by agent and status"),
            ("km.agent.cost", "USD", "AI spend reported by agent runs"),
        ):
            self._tallies[name] = Counter()
            telemetry.meter.create_observable_counter(name, [self._observer(name)], unit=unit, description=description)

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                current = list(self._tallies[name].items())
            return [Observation(value, dict(labels)) for labels, value in current]

        return observe

    def _count(self, name: str, amount: float, **labels: str) -> None:
        with self._lock:
            self._tallies[name][tuple(sorted(labels.items()))] += amount  # type: ignore[assignment]

    def watch_budget(self, ai_max_usd: float | None, compute_max_usd: float | None) -> None:
        """Budget usage as gauges: AI spend so far (what finished runs reported) against the caps."""
        meter = self.telemetry.meter

        def spent(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                return [Observation(sum(self._tallies["km.agent.cost"].values()), {"pool": "ai"})]

        def limits(_options: CallbackOptions) -> Iterable[Observation]:
            caps = {"ai": ai_max_usd, "compute": compute_max_usd}
            return [Observation(cap, {"pool": pool}) for pool, cap in caps.items() if cap]

        meter.create_observable_gauge("km.budget.spent", [spent], unit="USD", description="AI spend reported by runs")
        meter.create_observable_gauge("km.budget.limit", [limits], unit="USD", description="The profile's spend caps")

    # ---- names -----------------------------------------------------------------------------------
    def host_of(self, address: str) -> str | None:
        """The DNS name last answered with this address, if the sandbox resolved it through us."""
        with self._lock:
            return self._names.get(address)

    def _remember(self, name: str, addresses: Sequence[str]) -> None:
        with self._lock:
            for address in addresses:
                self._names[address] = name
                self._names.move_to_end(address)
            while len(self._names) > NAMES_REMEMBERED:
                self._names.popitem(last=False)

    # ---- events ----------------------------------------------------------------------------------
    def dns(self, *, name: str, qtype: str, decision: str, rcode: str, addresses: Sequence[str]) -> None:
        """`decision`: allowed, denied, or would_deny (learn mode answered it anyway)."""
        if addresses and decision != "denied":
            self._remember(name, addresses)
        self._count("km.dns.queries", 1, decision=decision)
        severity = SeverityNumber.INFO if decision == "allowed" else SeverityNumber.WARN
        self._emit(
            "dns", severity, {"host": name, "qtype": qtype, "decision": decision, "rcode": rcode, "addresses": list(addresses)}
        )

    def gate(self, *, decision: str, address: str, port: int, protocol: str, pid: int, process: str) -> None:
        """A connection the gate refused (`denied`) or would have refused in learn mode (`would_deny`)."""
        self._count("km.gate.decisions", 1, decision=decision, protocol=protocol)
        attributes: dict[str, Any] = {
            "decision": decision,
            "host": self.host_of(address) or address,
            "address": address,
            "port": port,
            "protocol": protocol,
            "pid": pid,
            "process": process,
        }
        self._emit("gate", SeverityNumber.WARN, attributes)

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
        """Captured SSL calls on one connection in one direction (`calls` of them, `size` bytes in all);
        `payload` only when the profile asks for plaintext."""
        self._count("km.tls.calls", calls, direction=direction)
        self._count("km.tls.bytes", size, direction=direction)
        attributes: dict[str, Any] = {"pid": pid, "process": process, "direction": direction, "bytes": size, "calls": calls}
        if peer is not None:
            address, port = peer
            attributes.update(address=address, port=port, host=self.host_of(address) or address)
        for key, value in (http or {}).items():
            attributes[f"http.{key}"] = value
        if payload:
            attributes["payload"] = payload.decode("utf-8", PAYLOAD_ENCODING_ERRORS)
        self._emit("tls", SeverityNumber.INFO, attributes, timestamp=time)

    def tls_unobserved(self, *, pid: int, process: str, exe: str, reason: str) -> None:
        """A process with network connections whose TLS the libssl probes cannot see."""
        attributes = {"pid": pid, "process": process, "exe": exe, "reason": reason}
        self._emit("tls_unobserved", SeverityNumber.WARN, attributes)

    def agent_run(self, result: Mapping[str, Any], *, started: float | None, ended: float | None) -> None:
        """A finished run: a span covering it (for trace views) and a record with its result fields."""
        usage = result.get("usage") or {}
        attributes: dict[str, AttributeValue] = {
            key: value
            for key, value in {
                "run_id": result.get("run_id"),
                "agent": result.get("agent"),
                "status": result.get("status"),
                "exit_code": result.get("exit_code"),
                "cost_usd": result.get("total_cost_usd"),
                "input_tokens": usage.get("input_tokens") if isinstance(usage, Mapping) else None,
                "output_tokens": usage.get("output_tokens") if isinstance(usage, Mapping) else None,
                "duration_s": (result["duration_ms"] / 1000) if isinstance(result.get("duration_ms"), int | float) else None,
                "session_id": result.get("session_id"),
                "num_turns": result.get("num_turns"),
                "error": result.get("error"),
            }.items()
            if value is not None
        }
        labels = {"agent": str(result.get("agent")), "status": str(result.get("status"))}
        self._count("km.agent.runs", 1, **labels)
        if isinstance(result.get("total_cost_usd"), int | float):
            self._count("km.agent.cost", float(result["total_cost_usd"]), agent=labels["agent"])
        try:
            start_ns = int(started * 1e9) if started is not None else None
            span = self.telemetry.tracer.start_span("agent_run", attributes=attributes, start_time=start_ns)
            span.end(end_time=int(ended * 1e9) if ended is not None else None)
        except Exception:
            log.exception("recording the agent_run span failed")
        failed = result.get("status") != "complete"
        self._emit("agent_run", SeverityNumber.WARN if failed else SeverityNumber.INFO, attributes, timestamp=ended)

    def _emit(
        self, name: str, severity: SeverityNumber, attributes: Mapping[str, Any], *, timestamp: float | None = None
    ) -> None:
        try:
            self.telemetry.logger.emit(
                event_name=name,
                body=f"km.{name}",
                severity_number=severity,
                attributes={"event.name": name, **{k: v for k, v in attributes.items() if v is not None}},
                timestamp=int(timestamp * 1e9) if timestamp is not None else None,
            )
        except Exception:
            log.exception("emitting a %s event failed", name)
