"""The spool's direct log encoder writes exactly the OTLP/JSON the SDK's encoder and protobuf would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from host_agent.telemetry.log_json import logs_json
from host_agent.telemetry.otlp_json import request_to_json


class Keep(LogRecordExporter):
    def __init__(self) -> None:
        self.records: list[ReadableLogRecord] = []

    def export(self, batch: Any) -> LogRecordExportResult:
        self.records.extend(batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def records(resources: list[Resource], emit: Any) -> list[ReadableLogRecord]:
    kept = Keep()
    for resource in resources:
        provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_log_record_processor(SimpleLogRecordProcessor(kept))
        emit(provider)
    return kept.records


def protobuf_json(batch: list[ReadableLogRecord]) -> Any:
    return json.loads(request_to_json(encode_logs(batch)))


VALUES: list[Any] = [
    "text",
    "",
    0,
    -7,
    2**62,
    1.5,
    True,
    False,
    ["a", "b"],
    [1, 2],
    [],
    b"\x00\xffbytes",
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_each_attribute_type_is_written_as_protobuf_would(value: Any) -> None:
    def emit(provider: LoggerProvider) -> None:
        provider.get_logger("km-host-agent").emit(event_name="tls", body="km.tls", attributes={"field": value}, timestamp=1)

    batch = records([Resource({"service.name": "km-host-agent"})], emit)
    assert logs_json(batch) == protobuf_json(batch)


@pytest.mark.parametrize("body", ["a message", {"nested": {"list": [1, "x"]}, "n": 2}, ["x", 1.0], None, 42])
def test_bodies_are_written_as_protobuf_would(body: Any) -> None:
    def emit(provider: LoggerProvider) -> None:
        provider.get_logger("scope", "1.2.3").emit(body=body, severity_number=SeverityNumber.WARN, severity_text="WARN")

    batch = records([Resource({"service.name": "x"})], emit)
    assert logs_json(batch) == protobuf_json(batch)


def test_resources_scopes_ids_and_times_group_as_protobuf_would() -> None:
    tracer = TracerProvider().get_tracer("t")

    def emit(provider: LoggerProvider) -> None:
        for scope in ("km-host-agent", "com.anthropic.claude_code.events"):
            logger = provider.get_logger(scope, "2.0", schema_url="https://opentelemetry.io/schemas/1.21.0")
            logger.emit(
                event_name="dns", attributes={"host": "a.test", "addresses": ["192.0.2.1"]}, timestamp=5, observed_timestamp=6
            )
            with tracer.start_as_current_span("agent_run"):
                logger.emit(event_name="agent_run", attributes={"cost_usd": 0.25, "exit_code": 0})

    resources = [
        Resource({"service.name": "km-host-agent", "km.sandbox.id": "sb-1"}, schema_url="https://example.test/schema"),
        Resource({"service.name": "claude-code", "km.sandbox.id": "sb-1"}),
    ]
    batch = records(resources, emit)
    assert len(batch) == 8
    assert logs_json(batch) == protobuf_json(batch)
