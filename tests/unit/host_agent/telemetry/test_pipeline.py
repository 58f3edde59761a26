"""The daemon's Telemetry, exporting for real: to the spool by default, or over OTLP/HTTP to a collector."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from host_agent.telemetry import ExportCounts, Spool, Telemetry, TelemetryError, request_from_json, sandbox_resource
from tests.unit.host_agent.telemetry.helpers import CollectorStub, attributes_of

KM_RESOURCE = {"service.name": "km-host-agent", "km.sandbox.id": "sb-1", "km.profile": "goose", "cloud.region": "eu-west-1"}


def record_one_of_each(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("agent_run", attributes={"km.run.id": "run-7", "exit_code": 0}):
        telemetry.logger.emit(
            event_name="km.gate.decision",
            body="denied evil.test",
            attributes={"host": "evil.test", "decision": "deny"},
            severity_number=SeverityNumber.WARN,
        )
    telemetry.meter.create_counter("km.gate.denied").add(3, {"host": "evil.test"})


def only_file(spool: Spool, signal: str) -> str:
    [path] = spool.files(signal)  # type: ignore[arg-type]
    return path.read_text()


def test_spool_exporters_write_otlp_json_with_the_resource_and_hex_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    telemetry = Telemetry(sandbox_resource("sb-1", "goose", "eu-west-1"), spool=spool, metric_export_interval_seconds=3600)
    record_one_of_each(telemetry)
    assert telemetry.force_flush()

    raw_traces = only_file(spool, "traces")
    raw_span = json.loads(raw_traces)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert re.fullmatch("[0-9a-f]{32}", raw_span["traceId"]) and re.fullmatch("[0-9a-f]{16}", raw_span["spanId"])
    traces = request_from_json("traces", raw_traces)
    assert isinstance(traces, ExportTraceServiceRequest)
    [resource_spans] = traces.resource_spans
    assert attributes_of(resource_spans.resource.attributes) == KM_RESOURCE
    [span] = resource_spans.scope_spans[0].spans
    assert (span.name, attributes_of(span.attributes)) == ("agent_run", {"km.run.id": "run-7", "exit_code": 0})
    assert span.trace_id.hex() == raw_span["traceId"]

    metrics = request_from_json("metrics", only_file(spool, "metrics"))
    assert isinstance(metrics, ExportMetricsServiceRequest)
    assert attributes_of(metrics.resource_metrics[0].resource.attributes) == KM_RESOURCE
    [metric] = metrics.resource_metrics[0].scope_metrics[0].metrics
    [point] = metric.sum.data_points
    assert (metric.name, point.as_int, attributes_of(point.attributes)) == ("km.gate.denied", 3, {"host": "evil.test"})

    raw_logs = only_file(spool, "logs")
    raw_record = json.loads(raw_logs)["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert raw_record["traceId"] == raw_span["traceId"] and raw_record["spanId"] == raw_span["spanId"]
    logs = request_from_json("logs", raw_logs)
    assert isinstance(logs, ExportLogsServiceRequest)
    assert attributes_of(logs.resource_logs[0].resource.attributes) == KM_RESOURCE
    [record] = logs.resource_logs[0].scope_logs[0].log_records
    assert (record.body.string_value, record.event_name, record.severity_number) == ("denied evil.test", "km.gate.decision", 13)
    assert attributes_of(record.attributes) == {"host": "evil.test", "decision": "deny"}

    telemetry.shutdown()
    telemetry.shutdown()  # twice is harmless
    # Shutdown collects the (cumulative) metrics once more; spans and logs had nothing left.
    assert telemetry.stats() == {"traces": ExportCounts(1, 0), "metrics": ExportCounts(2, 0), "logs": ExportCounts(1, 0)}
    assert len(spool.files("metrics")) == 2


def test_no_region_no_cloud_region(tmp_path: Path) -> None:
    assert dict(sandbox_resource("sb-1", "goose", None).attributes) == {
        "service.name": "km-host-agent",
        "km.sandbox.id": "sb-1",
        "km.profile": "goose",
    }


def test_otlp_http_to_an_operator_collector_carries_the_headers(tmp_path: Path) -> None:
    with CollectorStub() as collector:
        telemetry = Telemetry(
            sandbox_resource("sb-1", "goose", "eu-west-1"),
            endpoint=collector.endpoint + "/",
            headers={"x-api-key": "secret-for-test"},
            metric_export_interval_seconds=3600,
        )
        record_one_of_each(telemetry)
        telemetry.shutdown()  # flushes
    by_path = {captured.path: captured for captured in collector.requests}
    assert sorted(by_path) == ["/v1/logs", "/v1/metrics", "/v1/traces"]
    for captured in collector.requests:
        assert captured.headers["x-api-key"] == "secret-for-test"
        assert captured.headers["content-type"] == "application/x-protobuf"
        assert captured.headers["content-encoding"] == "gzip"
    traces = ExportTraceServiceRequest.FromString(by_path["/v1/traces"].body)
    assert attributes_of(traces.resource_spans[0].resource.attributes) == KM_RESOURCE
    assert traces.resource_spans[0].scope_spans[0].spans[0].name == "agent_run"
    metrics = ExportMetricsServiceRequest.FromString(by_path["/v1/metrics"].body)
    assert metrics.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].as_int == 3
    logs = ExportLogsServiceRequest.FromString(by_path["/v1/logs"].body)
    assert logs.resource_logs[0].scope_logs[0].log_records[0].body.string_value == "denied evil.test"
    assert telemetry.stats()["traces"] == ExportCounts(1, 0)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_collector_is_counted_never_raised() -> None:
    telemetry = Telemetry(
        sandbox_resource("sb-1", "goose", None),
        endpoint=f"http://127.0.0.1:{closed_port()}",
        metric_export_interval_seconds=3600,
        export_timeout_seconds=0.5,
    )
    record_one_of_each(telemetry)
    telemetry.force_flush(timeout_seconds=5)
    telemetry.shutdown(timeout_seconds=5)
    stats = telemetry.stats()
    assert (stats["traces"], stats["logs"]) == (ExportCounts(1, 1), ExportCounts(1, 1))
    assert stats["metrics"] == ExportCounts(2, 2)  # the flush's collection and the shutdown's


def test_a_spool_that_cannot_be_written_is_counted_never_raised(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "traces").rmdir()
    (tmp_path / "spool" / "traces").write_text("a file where the signal directory should be")
    telemetry = Telemetry(sandbox_resource("sb-1", "goose", None), spool=spool, metric_export_interval_seconds=3600)
    record_one_of_each(telemetry)
    telemetry.force_flush()
    telemetry.shutdown()
    stats = telemetry.stats()
    assert stats["traces"] == ExportCounts(1, 1)
    assert stats["logs"] == ExportCounts(1, 0)
    assert list((tmp_path / "spool" / ".tmp").iterdir()) == []


def test_telemetry_needs_somewhere_to_go() -> None:
    with pytest.raises(TelemetryError, match="destination"):
        Telemetry(sandbox_resource("sb-1", "goose", None))
