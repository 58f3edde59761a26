"""A sandbox's telemetry read back on the operator's side: `km otel`.

`read_sandbox_telemetry(ref)` finds and reads a sandbox's OTLP/JSON files into `TelemetryEvent`s (pure
parsing lives in `events`, `read_telemetry(directory)`); `select_events` applies `--prompts`/`--tools`;
`render_timeline` turns events into the operator's lines.
"""

from controller.telemetry.events import (
    KNOWN_TYPES,
    PROMPT_TYPES,
    TOOL_TYPES,
    TelemetryEvent,
    TelemetryRead,
    UnreadableFile,
    read_telemetry,
    select_events,
)
from controller.telemetry.reading import SandboxTelemetry, read_sandbox_telemetry, request_flush
from controller.telemetry.timeline import Totals, render_timeline, totals

__all__ = [
    "KNOWN_TYPES",
    "PROMPT_TYPES",
    "SandboxTelemetry",
    "TOOL_TYPES",
    "TelemetryEvent",
    "TelemetryRead",
    "Totals",
    "UnreadableFile",
    "read_sandbox_telemetry",
    "read_telemetry",
    "render_timeline",
    "request_flush",
    "select_events",
    "totals",
]
