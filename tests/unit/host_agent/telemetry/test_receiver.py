"""The loopback OTLP receiver, over real HTTP: what Claude Code sends arrives stamped with the sandbox's attributes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from host_agent.telemetry import OtlpReceiver, Spool, request_from_json
from tests.unit.host_agent.telemetry.helpers import KM_ATTRIBUTES, ListSink, attributes_of, claude_code_logs_request, post

PROTOBUF, JSON = "application/x-protobuf", "application/json"


def only_logs(sink: ListSink) -> ExportLogsServiceRequest:
    [(signal, request)] = sink.received
    assert signal == "logs"
    assert isinstance(request, ExportLogsServiceRequest)
    return request


def assert_stamped_claude_prompt(request: ExportLogsServiceRequest) -> None:
    [resource_logs] = request.resource_logs
    resource = attributes_of(resource_logs.resource.attributes)
    assert resource == {"service.name": "claude-code", "service.version": "2.0.0", **KM_ATTRIBUTES}
    [record] = resource_logs.scope_logs[0].log_records
    assert record.event_name == "claude_code.user_prompt"
    assert attributes_of(record.attributes)["prompt"] == "fix the failing test"


def test_protobuf_from_claude_code_gets_the_sandbox_attributes_and_keeps_its_service_name(
    receiver: OtlpReceiver, sink: ListSink
) -> None:
    reply = post(receiver.port, "/v1/logs", claude_code_logs_request().SerializeToString(), PROTOBUF)
    assert (reply.status, reply.content_type) == (200, PROTOBUF)
    assert ExportLogsServiceResponse.FromString(reply.body) == ExportLogsServiceResponse()
    assert_stamped_claude_prompt(only_logs(sink))


def test_gzipped_protobuf(receiver: OtlpReceiver, sink: ListSink) -> None:
    reply = post(receiver.port, "/v1/logs", claude_code_logs_request().SerializeToString(), PROTOBUF, gzipped=True)
    assert reply.status == 200
    assert_stamped_claude_prompt(only_logs(sink))


def test_json_with_hex_ids_as_the_otlp_json_encoding_has_them(receiver: OtlpReceiver, sink: ListSink) -> None:
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "claude-code"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "com.anthropic.claude_code"},
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "claude_code.api_request",
                                "kind": 3,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": 1700000001000000000,
                                "attributes": [{"key": "model", "value": {"stringValue": "claude-sonnet"}}],
                                "someFieldFromTheFuture": True,
                            }
                        ],
                    }
                ],
            }
        ]
    }
    for gzipped in (False, True):
        reply = post(receiver.port, "/v1/traces", json.dumps(body).encode(), "application/json; charset=utf-8", gzipped=gzipped)
        assert (reply.status, reply.content_type) == (200, JSON)
        assert json.loads(reply.body) == {}
    assert len(sink.received) == 2
    for signal, request in sink.received:
        assert signal == "traces" and isinstance(request, ExportTraceServiceRequest)
        [resource_spans] = request.resource_spans
        assert attributes_of(resource_spans.resource.attributes) == {"service.name": "claude-code", **KM_ATTRIBUTES}
        [span] = resource_spans.scope_spans[0].spans
        assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
        assert span.span_id.hex() == "eee19b7ec3c1b174"
        assert span.end_time_unix_nano - span.start_time_unix_nano == 1_000_000_000


def test_the_sdks_own_otlp_exporters_reach_the_receiver_and_land_in_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    receiver = OtlpReceiver(KM_ATTRIBUTES, spool.write_request, port=0)
    receiver.start()
    try:
        base = f"http://127.0.0.1:{receiver.port}"
        agent = Resource({"service.name": "claude-code"})
        tracer_provider = TracerProvider(resource=agent, shutdown_on_exit=False)
        tracer_provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces", compression=Compression.Gzip))
        )
        logger_provider = LoggerProvider(resource=agent, shutdown_on_exit=False)
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{base}/v1/logs")))
        with tracer_provider.get_tracer("fake-agent").start_as_current_span("claude_code.tool", attributes={"tool_name": "Bash"}):
            logger_provider.get_logger("fake-agent").emit(
                event_name="claude_code.tool_decision", body="accept", attributes={"decision": "accept"}
            )
        tracer_provider.shutdown()
        logger_provider.shutdown()
    finally:
        receiver.stop()

    assert receiver.stats().accepted == {"traces": 1, "metrics": 0, "logs": 1}
    [trace_file] = spool.files("traces")
    traces = request_from_json("traces", trace_file.read_text())
    assert isinstance(traces, ExportTraceServiceRequest)
    [resource_spans] = traces.resource_spans
    assert attributes_of(resource_spans.resource.attributes) == {"service.name": "claude-code", **KM_ATTRIBUTES}
    [span] = resource_spans.scope_spans[0].spans
    assert (span.name, attributes_of(span.attributes)) == ("claude_code.tool", {"tool_name": "Bash"})
    [log_file] = spool.files("logs")
    logs = request_from_json("logs", log_file.read_text())
    assert isinstance(logs, ExportLogsServiceRequest)
    [record] = logs.resource_logs[0].scope_logs[0].log_records
    assert (record.event_name, record.body.string_value) == ("claude_code.tool_decision", "accept")
    assert record.trace_id == span.trace_id  # emitted inside the span: the log names it


def status_of(body: bytes) -> Status:
    return Status.FromString(body)


def test_refusals(receiver: OtlpReceiver, sink: ListSink) -> None:
    valid = claude_code_logs_request().SerializeToString()
    undecodable = post(receiver.port, "/v1/logs", b"\xff\xff\xff not protobuf", PROTOBUF)
    assert undecodable.status == 400 and "protobuf" in status_of(undecodable.body).message
    assert post(receiver.port, "/v1/logs", b"{not json", JSON).status == 400
    bad_id = json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "not-hex"}]}]}]}).encode()
    assert "hex" in json.loads(post(receiver.port, "/v1/logs", bad_id, JSON).body)["message"]
    assert post(receiver.port, "/v1/logs", b"[]", JSON).status == 400
    assert post(receiver.port, "/v1/logs", b"not gzip", PROTOBUF, headers={"Content-Encoding": "gzip"}).status == 400
    assert post(receiver.port, "/v1/profiles", valid, PROTOBUF).status == 404
    assert post(receiver.port, "/v1/logs", valid, "text/plain").status == 415
    assert post(receiver.port, "/v1/logs", valid, PROTOBUF, headers={"Content-Encoding": "br"}).status == 415
    assert post(receiver.port, "/v1/logs", b"x" * (64 * 1024 + 1), PROTOBUF).status == 413
    # Small on the wire, large once inflated: refused without inflating it all.
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    assert post(receiver.port, "/v1/logs", bomb, PROTOBUF, headers={"Content-Encoding": "gzip"}).status == 413
    assert sink.received == []
    stats = receiver.stats()
    assert (stats.requests, stats.rejected, stats.sink_failures) == (10, 10, 0)
    # Still serving after all that.
    assert post(receiver.port, "/v1/logs", valid, PROTOBUF).status == 200


def test_a_failing_sink_is_a_503_the_sender_may_retry(tmp_path: Path) -> None:
    def full_disk(signal: object, request: object) -> None:
        raise OSError(28, "No space left on device")

    receiver = OtlpReceiver(KM_ATTRIBUTES, full_disk, port=0)
    receiver.start()
    try:
        reply = post(receiver.port, "/v1/logs", claude_code_logs_request().SerializeToString(), PROTOBUF)
    finally:
        receiver.stop()
    assert reply.status == 503 and "No space left" in status_of(reply.body).message
    assert receiver.stats().sink_failures == 1
