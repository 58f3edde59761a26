"""OTLP/JSON: ids as lowercase hex both ways, everything else as protobuf's JSON mapping."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from host_agent.telemetry import OtlpDecodeError, request_from_json, request_to_json

ids16, ids8 = st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8)


@given(trace_id=ids16, span_id=ids8, parent=ids8, linked=ids16, blob=st.binary(max_size=16), name=st.text())
def test_round_trip_with_hex_ids_and_base64_bytes_values(
    trace_id: bytes, span_id: bytes, parent: bytes, linked: bytes, blob: bytes, name: str
) -> None:
    span = Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_CLIENT,
        links=[Span.Link(trace_id=linked, span_id=span_id)],
        attributes=[KeyValue(key="traceId", value=AnyValue(bytes_value=blob))],
    )
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    text = request_to_json(request)
    encoded = json.loads(text)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert (encoded["traceId"], encoded["spanId"], encoded["parentSpanId"]) == (trace_id.hex(), span_id.hex(), parent.hex())
    assert encoded["links"][0]["traceId"] == linked.hex()
    assert encoded["kind"] == 3  # enums as integers
    assert request_from_json("traces", text) == request


@pytest.mark.parametrize(
    "body", [b"", b"[1]", b'{"resourceSpans": 3}', b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"spanId":"zz"}]}]}]}', b"\xff"]
)
def test_what_is_not_an_otlp_json_request(body: bytes) -> None:
    with pytest.raises(OtlpDecodeError):
        request_from_json("traces", body)
