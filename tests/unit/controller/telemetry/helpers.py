"""Telemetry files made the way a sandbox makes them: km's records through the host agent's real Telemetry and
Spool, Claude Code's as real OTLP protobuf requests spooled as the daemon's receiver spools them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from host_agent.telemetry import Spool, Telemetry, sandbox_resource

SANDBOX_ID = "sb-otel-0001"
# 2025-05-01T12:00:00Z in nanoseconds since the epoch.
T0 = 1_746_100_800_000_000_000


def at(seconds: float) -> int:
    """T0 plus `seconds`, in nanoseconds."""
    return T0 + round(seconds * 1e9)


@dataclass(frozen=True)
class KmEvent:
    """A log record the host agent emits: `km.<name>` with its attributes."""

    time: int
    name: str
    attributes: Mapping[str, Any]


@dataclass(frozen=True)
class RunSpan:
    """An `agent_run` span, from `start` to `end`."""

    start: int
    end: int
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaudeEvent:
    """An event as Claude Code exports it: every attribute a string, the name in `event.name` and the body."""

    time: int
    name: str
    attributes: Mapping[str, str]


def write_km_telemetry(spool: Spool, events: Sequence[KmEvent] = (), runs: Sequence[RunSpan] = ()) -> None:
    """Through the daemon's own pipeline: one flush, so one logs file and one traces file."""
    telemetry = Telemetry(sandbox_resource(SANDBOX_ID, "goose", None), spool=spool, metric_export_interval_seconds=3600)
    try:
        for event in events:
            # As host_agent.telemetry.events emits them: the name in all three places a reader may look.
            telemetry.logger.emit(
                timestamp=event.time,
                event_name=event.name,
                body=f"km.{event.name}",
                attributes={"event.name": event.name, **event.attributes},
            )
        for run in runs:
            span = telemetry.tracer.start_span("agent_run", start_time=run.start, attributes=dict(run.attributes))
            span.end(end_time=run.end)
        assert telemetry.force_flush()
    finally:
        telemetry.shutdown()


def claude_logs_request(events: Sequence[ClaudeEvent]) -> ExportLogsServiceRequest:
    records = [
        LogRecord(
            time_unix_nano=event.time,
            observed_time_unix_nano=event.time + 5_000_000,
            event_name=f"claude_code.{event.name}",
            body=AnyValue(string_value=f"claude_code.{event.name}"),
            attributes=[
                KeyValue(key="event.name", value=AnyValue(string_value=event.name)),
                KeyValue(key="session.id", value=AnyValue(string_value="session-1")),
                *(KeyValue(key=key, value=AnyValue(string_value=value)) for key, value in event.attributes.items()),
            ],
        )
        for event in events
    ]
    # The receiver adds the sandbox's attributes to Claude Code's own resource.
    resource = Resource(
        attributes=[
            KeyValue(key="service.name", value=AnyValue(string_value="claude-code")),
            KeyValue(key="km.sandbox.id", value=AnyValue(string_value=SANDBOX_ID)),
            KeyValue(key="km.profile", value=AnyValue(string_value="goose")),
        ]
    )
    scope = InstrumentationScope(name="com.anthropic.claude_code.events", version="2.0.0")
    return ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(resource=resource, scope_logs=[ScopeLogs(scope=scope, log_records=records)])]
    )


def write_claude_telemetry(spool: Spool, events: Sequence[ClaudeEvent]) -> list[Path]:
    """As the daemon's OTLP receiver hands Claude Code's export to the spool."""
    return spool.write_request("logs", claude_logs_request(events))


# One of each event type, in time order, from both sources.
KM_EVENTS = [
    KmEvent(
        at(1.0),
        "dns",
        {"host": "api.example.test", "qtype": "A", "decision": "allowed", "rcode": "NOERROR", "addresses": ["93.184.216.34"]},
    ),
    KmEvent(
        at(1.2),
        "tls",
        {
            "host": "api.example.test",
            "address": "93.184.216.34",
            "port": 443,
            "pid": 1234,
            "process": "curl",
            "direction": "write",
            "bytes": 517,
            "http.protocol": "HTTP/1.1",
            "http.method": "GET",
            "http.path": "/v1/x",
            "http.host": "api.example.test",
        },
    ),
    KmEvent(
        at(1.3),
        "tls",
        {
            "host": "api.example.test",
            "address": "93.184.216.34",
            "port": 443,
            "pid": 1234,
            "process": "curl",
            "direction": "read",
            "bytes": 2048,
            "http.status": 200,
        },
    ),
    KmEvent(at(2.0), "dns", {"host": "evil.test", "qtype": "AAAA", "decision": "denied", "rcode": "REFUSED", "addresses": []}),
    KmEvent(
        at(2.5),
        "gate",
        {
            "decision": "denied",
            "host": "10.9.9.9",
            "address": "10.9.9.9",
            "port": 443,
            "protocol": "tcp",
            "pid": 1234,
            "process": "curl",
        },
    ),
    KmEvent(
        at(3.0),
        "tls_unobserved",
        {"process": "node", "pid": 77, "exe": "/usr/bin/node", "reason": "statically linked BoringSSL"},
    ),
    KmEvent(
        at(20.0),
        "agent_run",
        {
            "run_id": "run-1",
            "agent": "claude",
            "status": "complete",
            "exit_code": 0,
            "cost_usd": 0.05,
            "input_tokens": 2400,
            "output_tokens": 680,
            "duration_s": 12.3,
            "session_id": "session-1",
        },
    ),
]
CLAUDE_EVENTS = [
    ClaudeEvent(at(0.5), "user_prompt", {"prompt_length": "20", "prompt": "fix the failing test"}),
    ClaudeEvent(
        at(4.0),
        "api_request",
        {
            "model": "claude-sonnet-4",
            "cost_usd": "0.0123",
            "duration_ms": "2100",
            "input_tokens": "1200",
            "output_tokens": "340",
            "cache_read_tokens": "0",
            "cache_creation_tokens": "50",
        },
    ),
    ClaudeEvent(at(5.0), "tool_decision", {"tool_name": "Bash", "decision": "accept", "source": "config"}),
    ClaudeEvent(at(6.0), "tool_result", {"tool_name": "Bash", "success": "true", "duration_ms": "120", "decision": "accept"}),
    ClaudeEvent(
        at(7.0), "api_error", {"model": "claude-sonnet-4", "error": "Overloaded", "status_code": "529", "duration_ms": "300"}
    ),
    ClaudeEvent(
        at(8.0),
        "api_request",
        {"model": "claude-sonnet-4", "cost_usd": "0.0456", "duration_ms": "900", "input_tokens": "1000", "output_tokens": "200"},
    ),
]
