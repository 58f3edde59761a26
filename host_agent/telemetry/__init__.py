"""The host agent's OpenTelemetry: its own traces, metrics and logs, and a loopback receiver for the agent's.

`sandbox_resource()` names the sandbox; `Telemetry(resource, spool=Spool(dir))` (or `endpoint=`/`headers=` for an
operator's collector) gives the daemon a tracer, a meter and a logger; `OtlpReceiver(sandbox_attributes(...),
spool.write_request)` takes Claude Code's own export. Spool files are OTLP/JSON, read back with
`request_from_json`.
"""

from host_agent.telemetry.otlp_json import SIGNALS, OtlpDecodeError, OtlpRequest, Signal, request_from_json, request_to_json
from host_agent.telemetry.pipeline import ExportCounts, Telemetry, TelemetryError
from host_agent.telemetry.receiver import OtlpReceiver, ReceiverStats
from host_agent.telemetry.resource import sandbox_attributes, sandbox_resource
from host_agent.telemetry.spool import (
    Spool,
    SpoolError,
    SpoolLogExporter,
    SpoolMetricExporter,
    SpoolSpanExporter,
    SpoolStats,
)

__all__ = [
    "SIGNALS",
    "ExportCounts",
    "OtlpDecodeError",
    "OtlpReceiver",
    "OtlpRequest",
    "ReceiverStats",
    "Signal",
    "Spool",
    "SpoolError",
    "SpoolLogExporter",
    "SpoolMetricExporter",
    "SpoolSpanExporter",
    "SpoolStats",
    "Telemetry",
    "TelemetryError",
    "request_from_json",
    "request_to_json",
    "sandbox_attributes",
    "sandbox_resource",
]
