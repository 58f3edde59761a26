"""A sandbox's telemetry files, read back as one list of events an operator can follow in time order.

The host agent spools OTLP/JSON (one Export*ServiceRequest per file) under `<dir>/<signal>/`: its own
records (DNS answers, gate denials, TLS traffic, agent runs) and Claude Code's forwarded events. Each log
record becomes one `TelemetryEvent`; an `agent_run` span counts only when no log record tells of the same
run. Reading never raises on a bad file: files that do not parse are returned so the caller can say so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from host_agent.telemetry.otlp_json import OtlpDecodeError, OtlpRequest, Signal, request_from_json

KNOWN_TYPES: Final = (
    "dns",
    "gate",
    "tls",
    "tls_unobserved",
    "agent_run",
    "user_prompt",
    "api_request",
    "api_error",
    "tool_decision",
    "tool_result",
)
PROMPT_TYPES: Final = frozenset({"user_prompt"})
TOOL_TYPES: Final = frozenset({"tool_decision", "tool_result"})
UNNAMED_TYPE: Final = "log"  # a record with no event name and no string body
_TYPE_PREFIXES: Final = ("claude_code.", "km.")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# Claude Code exports every attribute as a string; these are numbers (or a flag) whoever sent them, so
# `jq` sums and the timeline's arithmetic work on both sources alike.
_NUMBER_FIELDS: Final = frozenset(
    {
        "bytes",
        "cache_creation_tokens",
        "cache_read_tokens",
        "cost_usd",
        "duration_ms",
        "duration_s",
        "exit_code",
        "http.status",
        "http.stream",
        "input_tokens",
        "output_tokens",
        "pid",
        "port",
        "prompt_length",
        "status_code",
    }
)
_FLAG_FIELDS: Final = frozenset({"success"})
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class TelemetryEvent:
    """One thing that happened in the sandbox: when, what kind, and every attribute it came with."""

    time_unix_nano: int
    type: str
    fields: Mapping[str, Any]

    @property
    def time(self) -> datetime:
        # Integer arithmetic: a float of nanoseconds since 1970 loses the microseconds.
        return _EPOCH + timedelta(microseconds=self.time_unix_nano // 1000)

    def as_json(self) -> dict[str, Any]:
        """`{"time": "…Z", "type": …, **fields}`; an attribute named `time` or `type` cannot shadow those two."""
        stamp = self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"time": stamp, "type": self.type, **{k: v for k, v in self.fields.items() if k not in ("time", "type")}}


@dataclass(frozen=True)
class UnreadableFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class TelemetryRead:
    """Events oldest first (ties keep file order), and the files that had to be skipped."""

    events: list[TelemetryEvent]
    unreadable: list[UnreadableFile]


def read_telemetry(directory: Path) -> TelemetryRead:
    """Every event in `directory/logs/` and `directory/traces/`; a missing directory reads as no events."""
    unreadable: list[UnreadableFile] = []
    logged = [
        event
        for request in _requests(directory, "logs", unreadable)
        if isinstance(request, ExportLogsServiceRequest)
        for event in _log_events(request)
    ]
    spans = [
        event
        for request in _requests(directory, "traces", unreadable)
        if isinstance(request, ExportTraceServiceRequest)
        for event in _agent_run_span_events(request)
    ]
    return TelemetryRead(_merge(logged, spans), unreadable)


def select_events(events: Iterable[TelemetryEvent], *, prompts: bool = False, tools: bool = False) -> list[TelemetryEvent]:
    """All events, or only prompts and/or tool events when asked (the union when both are)."""
    wanted = (PROMPT_TYPES if prompts else frozenset()) | (TOOL_TYPES if tools else frozenset())
    return [event for event in events if not wanted or event.type in wanted]


def event_type(name: str) -> str:
    """`claude_code.api_request` and `km.dns` are `api_request` and `dns`: the source is not part of the kind."""
    for prefix in _TYPE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name or UNNAMED_TYPE


def _json_files(directory: Path) -> list[Path]:
    """A signal's complete files in name (= time) order; dot names are temporary or hidden."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("*.json") if not path.name.startswith("."))


def _requests(directory: Path, signal: Signal, unreadable: list[UnreadableFile]) -> Iterator[OtlpRequest]:
    """Each parsed file of one signal; a file that does not parse is added to `unreadable` instead."""
    for path in _json_files(directory / signal):
        try:
            request = request_from_json(signal, path.read_bytes())
        except FileNotFoundError:  # uploaded files can be pruned while we read: gone, not broken
            continue
        except (OSError, OtlpDecodeError) as error:
            unreadable.append(UnreadableFile(path, str(error)))
            continue
        yield request


def _log_events(request: ExportLogsServiceRequest) -> Iterator[TelemetryEvent]:
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                yield _log_event(record)


def _log_event(record: LogRecord) -> TelemetryEvent:
    fields = _attributes(record.attributes)
    body = _value(record.body)
    # `event.name` is what `type` is made of; kept as a field too it would only repeat it.
    name = fields.pop("event.name", None) or record.event_name or (body if isinstance(body, str) else "")
    kind = event_type(str(name))
    # Claude Code's body only repeats the event name; a message beside the name is data, and kept.
    if body not in (None, "") and not (isinstance(body, str) and event_type(body) == kind):
        fields.setdefault("body", body)
    return TelemetryEvent(record.time_unix_nano or record.observed_time_unix_nano, kind, fields)


def _agent_run_span_events(request: ExportTraceServiceRequest) -> Iterator[TelemetryEvent]:
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if event_type(span.name) != "agent_run":
                    continue
                fields = _attributes(span.attributes)
                if "duration_s" not in fields and span.start_time_unix_nano and span.end_time_unix_nano:
                    fields["duration_s"] = round((span.end_time_unix_nano - span.start_time_unix_nano) / 1e9, 3)
                # Stamped when the run ended, as its log record is.
                yield TelemetryEvent(span.end_time_unix_nano or span.start_time_unix_nano, "agent_run", fields)


def _merge(logged: list[TelemetryEvent], spans: Sequence[TelemetryEvent]) -> list[TelemetryEvent]:
    """Log records and the spans of runs no log record tells of, sorted by time (stable)."""
    logged_runs = {_run_id(event) for event in logged if event.type == "agent_run"} - {None}
    unlogged = [event for event in spans if _run_id(event) is None or _run_id(event) not in logged_runs]
    return sorted([*logged, *unlogged], key=lambda event: event.time_unix_nano)


def _run_id(event: TelemetryEvent) -> object:
    return event.fields.get("run_id", event.fields.get("km.run.id"))


def _attributes(key_values: Iterable[KeyValue]) -> dict[str, Any]:
    return {key_value.key: _normalise(key_value.key, _value(key_value.value)) for key_value in key_values}


def _value(value: AnyValue) -> Any:
    """An OTLP AnyValue as plain JSON data (int64s arrive as JSON strings; protobuf makes them ints)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _normalise(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key in _FLAG_FIELDS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if key in _NUMBER_FIELDS:
        if _INTEGER.fullmatch(value):
            return int(value)
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value
