"""The operator's timeline: one line per event with a readable summary, then totals that never double-count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.telemetry import TelemetryEvent, Totals, read_telemetry, render_timeline, select_events, totals
from controller.telemetry.timeline import footer_lines, summary, timeline_lines
from host_agent.telemetry import Spool
from tests.unit.controller.telemetry.helpers import (
    CLAUDE_EVENTS,
    KM_EVENTS,
    RunSpan,
    at,
    write_claude_telemetry,
    write_km_telemetry,
)


def event(kind: str, seconds: float = 0.0, **fields: Any) -> TelemetryEvent:
    return TelemetryEvent(at(seconds), kind, fields)


def test_a_whole_sandbox_reads_as_a_timeline(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "telemetry")
    write_claude_telemetry(spool, CLAUDE_EVENTS)
    write_km_telemetry(
        spool,
        KM_EVENTS,
        [RunSpan(at(30.0), at(42.5), {"run_id": "run-2", "agent": "codex", "status": "failed", "exit_code": 1, "cost_usd": 0.2})],
    )
    events = read_telemetry(spool.root).events
    assert render_timeline(events, events) == [
        "── 2025-05-01 UTC ──",
        '12:00:00.500  user_prompt    "fix the failing test"',
        "12:00:01.000  dns            api.example.test A → allowed (93.184.216.34)",
        "12:00:01.200  tls            write 517 B → api.example.test:443 curl[1234] GET /v1/x",
        "12:00:01.300  tls            read 2048 B ← api.example.test:443 curl[1234] 200",
        "12:00:02.000  dns            evil.test AAAA → DENIED (REFUSED)",
        "12:00:02.500  gate           DENIED tcp 10.9.9.9:443 by curl[1234]",
        "12:00:03.000  tls_unobserved node[77] /usr/bin/node: statically linked BoringSSL",
        "12:00:04.000  api_request    claude-sonnet-4 $0.0123 in=1200 out=340 (2.1 s)",
        "12:00:05.000  tool_decision  Bash accept (config)",
        "12:00:06.000  tool_result    Bash ok 120 ms",
        "12:00:07.000  api_error      claude-sonnet-4 529 Overloaded (300 ms)",
        "12:00:08.000  api_request    claude-sonnet-4 $0.0456 in=1000 out=200 (900 ms)",
        "12:00:20.000  agent_run      claude complete exit 0 $0.05 (12.3 s)",
        "12:00:42.500  agent_run      codex failed exit 1 $0.20 (12.5 s)",
        "--",
        "API cost $0.0579 (from API requests), tokens in 2200 / out 540",
        "14 events: agent_run 2, api_error 1, api_request 2, dns 2, gate 1, tls 2, tls_unobserved 1, tool_decision 1, "
        "tool_result 1, user_prompt 1",
    ]


def test_filtered_lines_keep_the_totals_of_everything(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "telemetry")
    write_claude_telemetry(spool, CLAUDE_EVENTS)
    events = read_telemetry(spool.root).events
    lines = render_timeline(select_events(events, tools=True), events)
    assert lines[1:3] == ["12:00:05.000  tool_decision  Bash accept (config)", "12:00:06.000  tool_result    Bash ok 120 ms"]
    assert lines[3:] == [
        "--",
        "API cost $0.0579 (from API requests), tokens in 2200 / out 540",
        "6 events: api_error 1, api_request 2, tool_decision 1, tool_result 1, user_prompt 1",
        "showing 2 of 6",
    ]


def test_a_new_day_gets_its_own_date_line() -> None:
    lines = timeline_lines([event("dns", 0, host="a.test"), event("dns", 12 * 3600 + 1.5, host="b.test")])
    assert lines == [
        "── 2025-05-01 UTC ──",
        "12:00:00.000  dns            a.test ? → ?",
        "── 2025-05-02 UTC ──",
        "00:00:01.500  dns            b.test ? → ?",
    ]


@pytest.mark.parametrize(
    ("kind", "fields", "expected"),
    [
        ("dns", {"host": "x.test", "qtype": "A", "decision": "would_deny", "rcode": "NOERROR", "addresses": ["10.0.0.1", "10.0.0.2"]},
         "x.test A → WOULD DENY (10.0.0.1, 10.0.0.2)"),
        ("dns", {"host": "x.test", "qtype": "A", "decision": "allowed"}, "x.test A → allowed"),
        ("gate", {"decision": "would_deny", "host": "evil.test", "address": "10.9.9.9", "port": 53, "protocol": "udp"},
         "WOULD DENY udp evil.test:53 (10.9.9.9)"),
        ("gate", {"decision": "denied", "address": "10.9.9.9", "port": 443, "protocol": "tcp", "process": "curl"},
         "DENIED tcp 10.9.9.9:443 by curl"),
        ("tls", {"address": "10.1.1.1", "port": 8443, "direction": "write", "bytes": 12}, "write 12 B → 10.1.1.1:8443"),
        ("tls", {"direction": "read", "bytes": 5}, "read 5 B ← ?"),
        ("tls_unobserved", {"process": "bun", "reason": "static TLS"}, "bun: static TLS"),
        ("agent_run", {"agent": "goose", "status": "running"}, "goose running"),
        ("user_prompt", {"prompt_length": 42, "prompt": "<REDACTED>"}, "(prompt not logged, 42 chars)"),
        ("user_prompt", {"prompt_length": 42}, "(prompt not logged, 42 chars)"),
        ("user_prompt", {}, "(prompt not logged)"),
        ("user_prompt", {"prompt": "fix\n  the   bug"}, '"fix the bug"'),
        ("user_prompt", {"prompt": "x" * 200}, '"' + "x" * 79 + '…"'),
        ("api_request", {"model": "claude-opus-4", "cost_usd": 1.5, "input_tokens": 10, "output_tokens": 2, "duration_ms": 12_345},
         "claude-opus-4 $1.50 in=10 out=2 (12.3 s)"),
        ("api_request", {"model": "m"}, "m $? in=? out=?"),
        ("api_error", {"model": "m", "error": "rate limited"}, "m rate limited"),
        ("tool_decision", {"tool_name": "Edit", "decision": "reject"}, "Edit reject"),
        ("tool_result", {"tool_name": "Bash", "success": False, "duration_ms": 2500, "error": "exit 1\nboom"},
         "Bash FAILED 2.5 s: exit 1 boom"),
        ("tool_result", {"tool_name": "Read"}, "Read ?"),
        ("mcp_connect", {"server": "github", "ok": True}, "server=github ok=True"),
        ("mcp_connect", {}, ""),
    ],
)  # fmt: skip
def test_summaries(kind: str, fields: dict[str, Any], expected: str) -> None:
    assert summary(TelemetryEvent(0, kind, fields)) == expected


def test_api_requests_are_the_cost_and_agent_runs_do_not_add_to_it() -> None:
    events = [
        event("api_request", cost_usd=0.01, input_tokens=100, output_tokens=10),
        event("api_request", cost_usd="0.02", input_tokens=200),  # a string that never became a number still counts
        event("agent_run", cost_usd=0.03, input_tokens=300, output_tokens=30),
        event("dns"),
    ]
    found = totals(events)
    assert found == Totals(
        cost_usd=pytest.approx(0.03), cost_source="api_request", input_tokens=300, output_tokens=10, counts=found.counts
    )
    assert found.counts == {"api_request": 2, "agent_run": 1, "dns": 1}


def test_without_api_requests_agent_runs_report_the_cost() -> None:
    found = totals([event("agent_run", cost_usd=0.05, input_tokens=2400, output_tokens=680), event("agent_run", cost_usd=0.25)])
    assert (found.cost_usd, found.cost_source) == (pytest.approx(0.30), "agent_run")
    assert (found.input_tokens, found.output_tokens) == (2400, 680)
    assert footer_lines(found, shown=2)[1] == "API cost $0.30 (as agent runs reported), tokens in 2400 / out 680"


def test_nothing_that_costs_money() -> None:
    found = totals([event("dns")])
    assert footer_lines(found, shown=1) == [
        "--",
        "API cost $0.00 (nothing reported a cost), tokens in 0 / out 0",
        "1 event: dns 1",
    ]
