"""OTLP requests per signal, and their OTLP/JSON encoding: protobuf's JSON mapping with hex trace and span ids.

protobuf's `json_format` writes `bytes` fields as base64, but the OTLP/JSON encoding requires `traceId`,
`spanId` and `parentSpanId` as lowercase hex strings (and enums as integers). The spool writes files in
that encoding, the receiver accepts it, and whatever reads the spool back uses `request_from_json`.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal, TypeAlias

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

Signal: TypeAlias = Literal["traces", "metrics", "logs"]
SIGNALS: tuple[Signal, ...] = ("traces", "metrics", "logs")
OtlpRequest: TypeAlias = ExportTraceServiceRequest | ExportMetricsServiceRequest | ExportLogsServiceRequest
OtlpResponse: TypeAlias = ExportTraceServiceResponse | ExportMetricsServiceResponse | ExportLogsServiceResponse

REQUEST_TYPES: dict[Signal, type[OtlpRequest]] = {
    "traces": ExportTraceServiceRequest,
    "metrics": ExportMetricsServiceRequest,
    "logs": ExportLogsServiceRequest,
}
RESPONSE_TYPES: dict[Signal, type[OtlpResponse]] = {
    "traces": ExportTraceServiceResponse,
    "metrics": ExportMetricsServiceResponse,
    "logs": ExportLogsServiceResponse,
}

# Field names as they appear in OTLP/JSON (lowerCamelCase); spans, span links, log records and metric
# exemplars all use these, and no other field of the OTLP messages has these names.
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


class OtlpDecodeError(ValueError):
    """A body that is not a valid OTLP request of the expected signal (the receiver answers 400)."""


def request_to_json(request: OtlpRequest) -> str:
    """The request in OTLP/JSON, compact, ids as lowercase hex."""
    tree = json_format.MessageToDict(request, use_integers_for_enums=True)
    _convert_ids(tree, _base64_to_hex)
    return json.dumps(tree, separators=(",", ":"))


def request_from_json(signal: Signal, text: str | bytes) -> OtlpRequest:
    """Parse an OTLP/JSON request; unknown fields are ignored, as the OTLP spec asks of receivers."""
    request = REQUEST_TYPES[signal]()
    try:
        tree = json.loads(text)
        if not isinstance(tree, dict):
            raise OtlpDecodeError(f"an OTLP/JSON {signal} request is a JSON object, not {type(tree).__name__}")
        _convert_ids(tree, _hex_to_base64)
        json_format.ParseDict(tree, request, ignore_unknown_fields=True)
    except OtlpDecodeError:
        raise
    except (ValueError, json_format.ParseError, RecursionError) as error:
        raise OtlpDecodeError(f"not an OTLP/JSON {signal} request: {error}") from error
    return request


def request_from_protobuf(signal: Signal, body: bytes) -> OtlpRequest:
    """Parse a binary protobuf OTLP request."""
    request = REQUEST_TYPES[signal]()
    try:
        request.ParseFromString(body)
    except Exception as error:  # protobuf's DecodeError, or a RecursionError on hostile nesting
        raise OtlpDecodeError(f"not a protobuf OTLP {signal} request: {error}") from error
    return request


def _convert_ids(node: Any, convert: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = convert(value)
            else:
                _convert_ids(value, convert)
    elif isinstance(node, list):
        for item in node:
            _convert_ids(item, convert)


def _base64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_to_base64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    except ValueError as error:
        raise OtlpDecodeError(f"trace and span ids in OTLP/JSON are hex strings, got {value!r}") from error
