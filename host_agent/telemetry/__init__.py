"""The host agent's OpenTelemetry: its own traces, metrics and logs, and a loopback receiver for the agent's.

`sandbox_resource()` names the sandbox; `Telemetry(resource, spool=Spool(dir))` (or `endpoint=`/`headers=` for an
operator's collector) gives the daemon a tracer, a meter and a logger; `OtlpReceiver(sandbox_attributes(...),
spool.write_request)` takes Claude Code's own export. Spool files are OTLP/JSON, read back with
`request_from_json`. `component.Observability` wires them into the daemon.

The names below are imported on first use: the SDK and protobuf take a third of a second to import, and
the daemon's fast paths (and `buffered`) must not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "SIGNALS": "otlp_json",
    "OtlpDecodeError": "otlp_json",
    "OtlpRequest": "otlp_json",
    "Signal": "otlp_json",
    "request_from_json": "otlp_json",
    "request_to_json": "otlp_json",
    "ExportCounts": "pipeline",
    "Telemetry": "pipeline",
    "TelemetryError": "pipeline",
    "OtlpReceiver": "receiver",
    "ReceiverStats": "receiver",
    "sandbox_attributes": "resource",
    "sandbox_resource": "resource",
    "Spool": "spool",
    "SpoolError": "spool",
    "SpoolLogExporter": "spool",
    "SpoolMetricExporter": "spool",
    "SpoolSpanExporter": "spool",
    "SpoolStats": "spool",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
