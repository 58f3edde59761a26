"""The daemon's telemetry: its own signals, the agents' forwarded ones, and where both go.

With an operator collector (`/etc/km/telemetry.env`: KM_OTLP_ENDPOINT, KM_OTLP_HEADERS) everything is
sent there over OTLP/HTTP. Without one, everything is spooled as OTLP/JSON and shipped to the artifacts
store (`telemetry/<sandbox>/<signal>/`), which `km otel` reads: no collector needed.

The loopback receiver takes the agents' own export (Claude Code's OTEL output) and passes it the same
way, stamped with the sandbox's attributes. Finished agent runs are reported once each, remembered
across restarts in the daemon's state directory.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.paths import OTLP_RECEIVER_PORT, TELEMETRY_ENV_PATH
from host_agent.runs.layout import ENDED_AT, STARTED_AT, TERMINAL, RunDir, RunFileError, all_runs
from host_agent.telemetry.events import SandboxEvents
from host_agent.telemetry.otlp_json import OtlpRequest, Signal
from host_agent.telemetry.pipeline import Telemetry
from host_agent.telemetry.receiver import PROTOBUF, OtlpReceiver
from host_agent.telemetry.resource import sandbox_attributes, sandbox_resource
from host_agent.telemetry.shipper import TelemetryShipper
from host_agent.telemetry.spool import Spool

log = logging.getLogger("km-host-agent.telemetry")

SPOOL_DIR = "telemetry-spool"
REPORTED_RUNS = "telemetry-runs.json"
FORWARD_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Destination:
    """An operator's OTLP/HTTP collector: base URL and headers (an API key, usually)."""

    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)


def parse_headers(text: str) -> dict[str, str]:
    """`key=value,key2=value2`, as OTEL_EXPORTER_OTLP_HEADERS spells them (values URL-decoded)."""
    from urllib.parse import unquote

    headers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"KM_OTLP_HEADERS entry {item!r} is not key=value")
        headers[key.strip()] = unquote(value.strip())
    return headers


def load_destination(path: Path = TELEMETRY_ENV_PATH) -> Destination | None:
    """The collector from telemetry.env; None when there is no file or no endpoint in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    values = dict(
        line.strip().partition("=")[::2] for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    endpoint = values.get("KM_OTLP_ENDPOINT", "").strip().strip("'\"")
    if not endpoint:
        return None
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"KM_OTLP_ENDPOINT in {path} must be an http:// or https:// URL, not {endpoint!r}")
    return Destination(endpoint.rstrip("/"), parse_headers(values.get("KM_OTLP_HEADERS", "").strip().strip("'\"")))


def forwarder(destination: Destination) -> Any:
    """A receiver sink that sends each (already stamped) request on to the collector as http/protobuf."""

    def forward(signal: Signal, request: OtlpRequest) -> None:
        body = request.SerializeToString()
        sent = urllib.request.Request(
            f"{destination.endpoint}/v1/{signal}",
            data=body,
            method="POST",
            headers={**destination.headers, "Content-Type": PROTOBUF},
        )
        with urllib.request.urlopen(sent, timeout=FORWARD_TIMEOUT_SECONDS) as response:  # noqa: S310 (operator URL)
            response.read()

    return forward


class Observability:
    def __init__(
        self,
        config: HostAgentConfig,
        identity: SandboxIdentity,
        state_dir: Path,
        *,
        destination: Destination | None = None,
        upload_target: Any = None,
        receiver_port: int = OTLP_RECEIVER_PORT,
        metric_export_interval_seconds: float = 60.0,
    ) -> None:
        self.config = config
        self.identity = identity
        self.state_dir = state_dir
        self.destination = destination
        self.upload_target = upload_target
        self.receiver_port = receiver_port
        self.metric_export_interval_seconds = metric_export_interval_seconds
        self.spool: Spool | None = None
        self.telemetry: Telemetry | None = None
        self.events: SandboxEvents | None = None
        self.receiver: OtlpReceiver | None = None
        self.receiver_error: str | None = None
        self.shipper: TelemetryShipper | None = None
        self._reported_file = state_dir / REPORTED_RUNS
        self._reported: set[str] = set()

    def start(self) -> SandboxEvents:
        resource = sandbox_resource(self.identity.sandbox_id, self.config.profile, self._region())
        interval = self.metric_export_interval_seconds
        if self.destination is not None:
            self.telemetry = Telemetry(
                resource,
                endpoint=self.destination.endpoint,
                headers=self.destination.headers,
                metric_export_interval_seconds=interval,
            )
            sink = forwarder(self.destination)
        else:
            self.spool = Spool(self.state_dir / SPOOL_DIR)
            self.telemetry = Telemetry(resource, spool=self.spool, metric_export_interval_seconds=interval)
            sink = self.spool.write_request
            if self.upload_target is not None:
                self.shipper = TelemetryShipper(self.spool, self.upload_target, self.identity.sandbox_id)
                self.shipper.start()
        self.events = SandboxEvents(self.telemetry)
        budget = self.config.budget
        self.events.watch_budget(budget.ai_max_usd, budget.compute_max_usd)
        attributes = sandbox_attributes(self.identity.sandbox_id, self.config.profile, self._region())
        self.receiver = OtlpReceiver(attributes, sink, port=self.receiver_port)
        try:
            self.receiver.start()
        except OSError as error:  # the daemon's own telemetry still works; say loudly that agents' does not
            self.receiver, self.receiver_error = None, f"{type(error).__name__}: {error}"
            log.error("OTLP receiver not started", extra={"fields": {"port": self.receiver_port, "error": self.receiver_error}})
        self._reported = self._load_reported()
        log.info(
            "telemetry started",
            extra={"fields": {"destination": self.telemetry.destination, "uploads": self.shipper is not None}},
        )
        return self.events

    def _region(self) -> str | None:
        return self.config.region if self.config.substrate == "ec2" else None

    def report_finished_runs(self, runs_root: Path) -> None:
        """Report each run that reached a terminal status since the last call (once per run, ever)."""
        if self.events is None:
            return
        fresh = [run for run in all_runs(runs_root) if run.run_id not in self._reported and run.status() in TERMINAL]
        for run in fresh:
            try:
                result = run.result() or {"run_id": run.run_id, "status": run.status()}
            except (RunFileError, ValueError):
                result = {"run_id": run.run_id, "status": run.status()}
            self.events.agent_run(result, started=_timestamp(run, STARTED_AT), ended=_timestamp(run, ENDED_AT))
            self._reported.add(run.run_id)
        if fresh:
            self._save_reported()

    def flush(self, timeout_seconds: float = 10.0) -> dict[str, Any]:
        """Export what is recorded and ship the spool now (what `km otel` asks for before reading)."""
        flushed = self.telemetry.force_flush(timeout_seconds) if self.telemetry is not None else False
        shipped = self.shipper.ship_now() if self.shipper is not None else None
        return {"flushed": flushed, "shipped": shipped}

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self.shipper is not None:
            self.shipper.stop()

    def status(self) -> dict[str, Any]:
        telemetry = self.telemetry
        return {
            "destination": telemetry.destination if telemetry else None,
            "exports": {signal: vars(counts) for signal, counts in telemetry.stats().items()} if telemetry else {},
            "receiver": (
                {"port": self.receiver.port, **vars(self.receiver.stats())}
                if self.receiver is not None
                else {"error": self.receiver_error}
            ),
            "spool": vars(self.spool.stats()) if self.spool is not None else None,
            "uploads": (
                {"shipped": self.shipper.shipped, "pending": self.shipper.pending(), "error": self.shipper.last_error}
                if self.shipper is not None
                else None
            ),
        }

    def _load_reported(self) -> set[str]:
        try:
            return set(json.loads(self._reported_file.read_text()))
        except (OSError, ValueError):
            return set()

    def _save_reported(self) -> None:
        self._reported_file.parent.mkdir(parents=True, exist_ok=True)  # with a collector there is no spool there
        temporary = self._reported_file.with_name(f".{self._reported_file.name}.tmp")
        temporary.write_text(json.dumps(sorted(self._reported)))
        temporary.replace(self._reported_file)


def _timestamp(run: RunDir, name: str) -> float | None:
    try:
        text = run.read_text(name)
        return datetime.fromisoformat(text).timestamp() if text else None
    except (RunFileError, ValueError):
        return None
