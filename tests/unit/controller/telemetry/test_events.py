"""Reading a sandbox's telemetry files into events: files written by the host agent's real pipeline and spool."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

import controller.telemetry
from controller.telemetry import KNOWN_TYPES, TelemetryEvent, read_telemetry, select_events
from controller.telemetry.events import event_type
from host_agent.telemetry import Spool, request_to_json
from tests.unit.controller.telemetry.helpers import (
    CLAUDE_EVENTS,
    KM_EVENTS,
    ClaudeEvent,
    KmEvent,
    RunSpan,
    at,
    write_claude_telemetry,
    write_km_telemetry,
)


def pick(event: TelemetryEvent, *keys: str) -> tuple[Any, ...]:
    return tuple(event.fields[key] for key in keys)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "telemetry")


def test_the_surface_is_short_and_sorted() -> None:
    assert controller.telemetry.__all__ == sorted(controller.telemetry.__all__)
    assert set(controller.telemetry.__all__) == {
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
    }


def test_km_records_keep_their_fields_with_typed_values(spool: Spool) -> None:
    write_km_telemetry(spool, KM_EVENTS)
    read = read_telemetry(spool.root)
    assert read.unreadable == []
    assert [event.type for event in read.events] == ["dns", "tls", "tls", "dns", "gate", "tls_unobserved", "agent_run"]
    dns, write, read_back, denied, gate, unobserved, run = read.events
    assert dict(dns.fields) == {
        "host": "api.example.test",
        "qtype": "A",
        "decision": "allowed",
        "rcode": "NOERROR",
        "addresses": ["93.184.216.34"],
    }
    assert denied.fields["addresses"] == []  # an empty array stays a list, not a missing field
    assert pick(write, "pid", "port", "bytes", "http.path") == (1234, 443, 517, "/v1/x")
    assert read_back.fields["http.status"] == 200
    assert gate.fields == {
        "decision": "denied",
        "host": "10.9.9.9",
        "address": "10.9.9.9",
        "port": 443,
        "protocol": "tcp",
        "pid": 1234,
        "process": "curl",
    }
    assert unobserved.fields["reason"] == "statically linked BoringSSL"
    assert pick(run, "cost_usd", "exit_code", "duration_s") == (0.05, 0, 12.3)
    assert [event.time_unix_nano for event in read.events] == [event.time for event in KM_EVENTS]


def test_claude_code_strings_become_numbers_and_flags(spool: Spool) -> None:
    write_claude_telemetry(spool, CLAUDE_EVENTS)
    events = read_telemetry(spool.root).events
    assert [event.type for event in events] == [
        "user_prompt",
        "api_request",
        "tool_decision",
        "tool_result",
        "api_error",
        "api_request",
    ]
    prompt, request, decision, result, error, _ = events
    assert pick(prompt, "prompt", "prompt_length", "session.id") == ("fix the failing test", 20, "session-1")
    assert "body" not in prompt.fields  # Claude Code's body only repeats the event name
    assert pick(request, "model", "cost_usd", "input_tokens") == ("claude-sonnet-4", 0.0123, 1200)
    assert pick(request, "cache_read_tokens", "cache_creation_tokens", "duration_ms") == (0, 50, 2100)
    assert pick(decision, "tool_name", "decision", "source") == ("Bash", "accept", "config")
    assert result.fields["success"] is True and result.fields["duration_ms"] == 120
    assert pick(error, "status_code", "error") == (529, "Overloaded")


def test_events_from_all_files_are_in_time_order_whatever_the_file_order(spool: Spool) -> None:
    # Claude Code's file is written (and named) first, but holds the later half of the story.
    late = [ClaudeEvent(at(10.0), "tool_decision", {"tool_name": "Edit", "decision": "accept", "source": "config"})]
    write_claude_telemetry(spool, late)
    write_km_telemetry(spool, [KmEvent(at(11.0), "dns", {"host": "b.test"}), KmEvent(at(9.0), "dns", {"host": "a.test"})])
    write_claude_telemetry(spool, [ClaudeEvent(at(9.5), "tool_result", {"tool_name": "Edit", "success": "false"})])
    assert len(spool.files("logs")) == 3
    events = read_telemetry(spool.root).events
    assert [(event.type, event.time_unix_nano) for event in events] == [
        ("dns", at(9.0)),
        ("tool_result", at(9.5)),
        ("tool_decision", at(10.0)),
        ("dns", at(11.0)),
    ]


def test_same_time_keeps_file_then_record_order(spool: Spool) -> None:
    write_claude_telemetry(spool, [ClaudeEvent(at(1.0), "tool_decision", {"tool_name": "first"})])
    write_claude_telemetry(
        spool,
        [
            ClaudeEvent(at(1.0), "tool_decision", {"tool_name": "second"}),
            ClaudeEvent(at(1.0), "tool_decision", {"tool_name": "third"}),
        ],
    )
    names = [event.fields["tool_name"] for event in read_telemetry(spool.root).events]
    assert names == ["first", "second", "third"]


def test_json_shape_has_utc_millisecond_time_type_and_fields(spool: Spool) -> None:
    write_km_telemetry(spool, KM_EVENTS[:5])
    write_claude_telemetry(spool, CLAUDE_EVENTS[:1])
    shapes = [event.as_json() for event in read_telemetry(spool.root).events]
    json.dumps(shapes)  # plain JSON data throughout
    assert shapes[0] == {
        "time": "2025-05-01T12:00:00.500Z",
        "type": "user_prompt",
        "session.id": "session-1",
        "prompt_length": 20,
        "prompt": "fix the failing test",
    }
    for shape in shapes[1:]:
        expected = {"time", "type", "host"} | ({"decision"} if shape["type"] in ("dns", "gate") else set())
        assert expected <= shape.keys(), shape
        assert shape["time"].startswith("2025-05-01T12:00:0") and shape["time"].endswith("Z")
    tls = shapes[2]
    assert (tls["time"], tls["type"], tls["host"], tls["direction"], tls["http.method"]) == (
        "2025-05-01T12:00:01.200Z",
        "tls",
        "api.example.test",
        "write",
        "GET",
    )
    assert list(tls)[:2] == ["time", "type"]


def test_an_attribute_named_type_or_time_cannot_shadow_the_event_s_own() -> None:
    event = TelemetryEvent(at(0), "dns", {"type": "A", "time": "later", "host": "x.test"})
    assert event.as_json() == {"time": "2025-05-01T12:00:00.000Z", "type": "dns", "host": "x.test"}


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_json_time_is_the_record_time_to_the_millisecond(time_unix_nano: int) -> None:
    stamp = TelemetryEvent(time_unix_nano, "dns", {}).as_json()["time"]
    assert stamp.endswith("Z") and len(stamp.split(".")[1]) == 4  # three digits and the Z
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=time_unix_nano // 1_000_000)


def test_a_run_span_counts_only_when_no_log_record_tells_of_the_run(spool: Spool) -> None:
    logged_run = KM_EVENTS[-1]  # agent_run run-1, logged at 20 s
    spans = [
        RunSpan(at(7.7), at(20.0), {"run_id": "run-1", "agent": "claude", "status": "complete"}),
        RunSpan(at(30.0), at(42.5), {"run_id": "run-2", "agent": "codex", "status": "failed", "exit_code": 1}),
    ]
    write_km_telemetry(spool, [logged_run], spans)
    runs = [event for event in read_telemetry(spool.root).events if event.type == "agent_run"]
    assert [(event.fields["run_id"], event.time_unix_nano) for event in runs] == [("run-1", at(20.0)), ("run-2", at(42.5))]
    assert runs[0].fields["cost_usd"] == 0.05  # the log record's, not the span's
    assert dict(runs[1].fields) == {"run_id": "run-2", "agent": "codex", "status": "failed", "exit_code": 1, "duration_s": 12.5}


def test_only_agent_run_spans_become_events(spool: Spool) -> None:
    write_km_telemetry(spool, runs=[RunSpan(at(1), at(2), {"run_id": "r"})])
    telemetry_file = spool.files("traces")[0]
    tree = json.loads(telemetry_file.read_text())
    tree["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"] = "gatekeeper.reload"
    telemetry_file.write_text(json.dumps(tree))
    assert read_telemetry(spool.root).events == []


def test_unreadable_files_are_listed_and_the_rest_still_read(spool: Spool) -> None:
    write_km_telemetry(spool, KM_EVENTS[:2], [RunSpan(at(5), at(6), {"run_id": "r"})])
    logs, traces = spool.root / "logs", spool.root / "traces"
    (logs / "00000000000000000001-000001.json").write_text("{not json")
    (logs / "00000000000000000002-000001.json").write_text("[1, 2]")
    (logs / "00000000000000000003-000001.json").write_bytes(b"\xff\xfe")
    (traces / "00000000000000000004-000001.json").write_text(
        '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"agent_run","traceId":"not-hex"}]}]}]}'
    )
    (logs / "00000000000000000005-000001.json").write_text('{"resourceLogs": "not a list"}')
    # Hidden and unfinished files are not telemetry yet, and not errors.
    (logs / ".00000000000000000006-000001.json").write_text("{half a fi")
    (logs / "00000000000000000007-000001.json.tmp").write_text("{half a fi")
    read = read_telemetry(spool.root)
    assert sorted(file.path.name for file in read.unreadable) == [f"0000000000000000000{n}-000001.json" for n in range(1, 6)]
    assert all(file.reason for file in read.unreadable)
    assert [event.type for event in read.events] == ["dns", "tls", "agent_run"]


def test_a_missing_or_empty_directory_has_no_events(tmp_path: Path) -> None:
    missing = read_telemetry(tmp_path / "nothing-here")
    assert (missing.events, missing.unreadable) == ([], [])
    empty = read_telemetry(Spool(tmp_path / "empty").root)
    assert (empty.events, empty.unreadable) == ([], [])


def test_unknown_and_unnamed_records_are_kept(spool: Spool) -> None:
    records = [
        LogRecord(
            time_unix_nano=at(2),
            body=AnyValue(string_value="claude_code.tool_permission_prompt"),
            attributes=[KeyValue(key="tool_name", value=AnyValue(string_value="Bash"))],
        ),
        LogRecord(
            observed_time_unix_nano=at(1),  # no time of its own: when it was seen
            body=AnyValue(int_value=7),
            attributes=[KeyValue(key="blob", value=AnyValue(bytes_value=b"\x01\xff"))],
        ),
    ]
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])
    (spool.root / "logs" / "1746100800000000000-000001.json").write_text(request_to_json(request))
    events = read_telemetry(spool.root).events
    assert [(event.type, dict(event.fields)) for event in events] == [
        ("log", {"blob": "01ff", "body": 7}),
        ("tool_permission_prompt", {"tool_name": "Bash"}),
    ]
    assert select_events(events) == events
    assert select_events(events, prompts=True, tools=True) == []


@pytest.mark.parametrize(
    ("record", "kind", "fields"),
    [
        (LogRecord(event_name="km.gate", body=AnyValue(string_value="km.gate")), "gate", {}),
        (LogRecord(event_name="gate", body=AnyValue(string_value="denied 10.9.9.9:443")), "gate", {"body": "denied 10.9.9.9:443"}),
        (LogRecord(body=AnyValue(string_value="km.tls_unobserved")), "tls_unobserved", {}),
        (
            LogRecord(
                event_name="claude_code.tool_result",
                attributes=[KeyValue(key="event.name", value=AnyValue(string_value="api_error"))],
            ),
            "api_error",
            {},
        ),
    ],
)  # fmt: skip
def test_the_name_is_event_name_else_the_record_s_event_name_else_its_body(
    spool: Spool, record: LogRecord, kind: str, fields: dict[str, Any]
) -> None:
    record.time_unix_nano = at(1)
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[record])])])
    (spool.root / "logs" / "1746100801000000000-000001.json").write_text(request_to_json(request))
    [event] = read_telemetry(spool.root).events
    assert (event.type, dict(event.fields)) == (kind, fields)


def test_a_numeric_field_that_is_not_a_number_stays_as_sent(spool: Spool) -> None:
    odd = {"cost_usd": "unknown", "duration_ms": "nan", "input_tokens": "-3", "output_tokens": "1e3"}
    write_claude_telemetry(spool, [ClaudeEvent(at(1), "api_request", odd)])
    [event] = read_telemetry(spool.root).events
    assert pick(event, "cost_usd", "duration_ms", "input_tokens", "output_tokens") == ("unknown", "nan", -3, 1000.0)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("claude_code.api_request", "api_request"),
        ("km.dns", "dns"),
        ("km.gate", "gate"),
        ("tool_result", "tool_result"),
        ("claude_code.km.odd", "km.odd"),  # one prefix, once
        ("kmdns", "kmdns"),
        ("", "log"),
    ],
)
def test_event_type_strips_one_source_prefix(name: str, kind: str) -> None:
    assert event_type(name) == kind


def test_filters_show_prompts_tools_or_their_union(spool: Spool) -> None:
    write_km_telemetry(spool, KM_EVENTS)
    write_claude_telemetry(spool, CLAUDE_EVENTS)
    events = read_telemetry(spool.root).events
    assert len(select_events(events)) == len(KM_EVENTS) + len(CLAUDE_EVENTS)
    assert [event.type for event in select_events(events, prompts=True)] == ["user_prompt"]
    assert [event.type for event in select_events(events, tools=True)] == ["tool_decision", "tool_result"]
    both = select_events(events, prompts=True, tools=True)
    assert [event.type for event in both] == ["user_prompt", "tool_decision", "tool_result"]
    assert {event.type for event in events} == set(KNOWN_TYPES)  # the fixtures cover every known type
