"""`km otel REF`, run as operators run it (a real `km` subprocess), against a sandbox record in a state store of
the test's own and telemetry files the host agent's real pipeline wrote into that sandbox's artifacts directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.state import SandboxRecord, SQLiteStateStore
from controller.substrates.local.substrate import LocalSubstrate
from controller.telemetry import request_flush
from host_agent.telemetry import Spool
from tests.unit.controller.telemetry.helpers import (
    CLAUDE_EVENTS,
    KM_EVENTS,
    SANDBOX_ID,
    RunSpan,
    at,
    write_claude_telemetry,
    write_km_telemetry,
)

KM = Path(sys.executable).parent / "km"
CREATED = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
# Resolving a local sandbox's substrate needs root (see controller.sandboxes.substrate_for).
needs_root = pytest.mark.root


def sandbox_record(status: str = "stopped", **resources: str) -> SandboxRecord:
    fields: dict[str, Any] = {
        "sandbox_id": SANDBOX_ID,
        "alias": "goose",
        "profile": "goose",
        "profile_file": None,
        "substrate": "local",
        "region": "local",
        "status": status,
        "plan_hash": "sha256:plan",
        "runtime_hash": "sha256:runtime",
        "policy_hash": "sha256:policy",
        "created_at": CREATED,
        "updated_at": CREATED,
        "ttl_expiry": None,
        "idle_timeout_seconds": None,
        "teardown_policy": "stop",
        "resources": resources,
    }
    return SandboxRecord(**fields)


@pytest.fixture
def km_env(tmp_path: Path) -> dict[str, str]:
    """State, sandboxes and artifacts all under tmp_path, and one stopped sandbox `goose` recorded."""
    env = {
        **os.environ,
        "KM_STATE_DIR": str(tmp_path / "state"),
        "KM_SANDBOX_DIR": str(tmp_path / "sandboxes"),
        "KM_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
    }
    store = SQLiteStateStore(tmp_path / "state" / "state.db")
    store.insert(sandbox_record())
    store.close()
    return env


@pytest.fixture
def telemetry_dir(tmp_path: Path) -> Path:
    """Where the local substrate keeps this sandbox's telemetry: `<artifacts>/telemetry/<sandbox_id>`."""
    return tmp_path / "artifacts" / "telemetry" / SANDBOX_ID


def km(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KM), *args], env=env, capture_output=True, text=True, timeout=60)


def write_everything(telemetry_dir: Path) -> Spool:
    spool = Spool(telemetry_dir)
    write_claude_telemetry(spool, CLAUDE_EVENTS)
    write_km_telemetry(spool, KM_EVENTS, [RunSpan(at(30), at(31), {"run_id": "run-2", "agent": "codex", "status": "failed"})])
    return spool


@needs_root
def test_timeline_is_the_default(km_env: dict[str, str], telemetry_dir: Path) -> None:
    write_everything(telemetry_dir)
    result = km(km_env, "otel", "goose")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "── 2025-05-01 UTC ──"
    assert lines[1] == '12:00:00.500  user_prompt    "fix the failing test"'
    assert "12:00:02.500  gate           DENIED tcp 10.9.9.9:443 by curl[1234]" in lines
    assert lines[-4:] == [
        "12:00:31.000  agent_run      codex failed (1.0 s)",
        "--",
        "API cost $0.0579 (from API requests), tokens in 2200 / out 540",
        "14 events: agent_run 2, api_error 1, api_request 2, dns 2, gate 1, tls 2, tls_unobserved 1, tool_decision 1, "
        "tool_result 1, user_prompt 1",
    ]
    assert km(km_env, "otel", "--timeline", SANDBOX_ID).stdout == result.stdout  # by id as by alias, --timeline or not


@needs_root
def test_json_is_a_list_of_events_and_nothing_else(km_env: dict[str, str], telemetry_dir: Path) -> None:
    write_everything(telemetry_dir)
    result = km(km_env, "otel", "goose", "--json")
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert len(events) == 14
    assert [event["time"] for event in events] == sorted(event["time"] for event in events)
    gate = next(event for event in events if event["type"] == "gate")
    assert gate == {
        "time": "2025-05-01T12:00:02.500Z",
        "type": "gate",
        "decision": "denied",
        "host": "10.9.9.9",
        "address": "10.9.9.9",
        "port": 443,
        "protocol": "tcp",
        "pid": 1234,
        "process": "curl",
    }
    api = [event for event in events if event["type"] == "api_request"]
    assert [event["cost_usd"] for event in api] == [0.0123, 0.0456]


@needs_root
def test_prompts_and_tools_filter_the_json_to_their_union(km_env: dict[str, str], telemetry_dir: Path) -> None:
    write_everything(telemetry_dir)
    prompts = json.loads(km(km_env, "otel", "goose", "--json", "--prompts").stdout)
    assert [(event["type"], event["prompt"]) for event in prompts] == [("user_prompt", "fix the failing test")]
    both = json.loads(km(km_env, "otel", "goose", "--json", "--prompts", "--tools").stdout)
    assert [event["type"] for event in both] == ["user_prompt", "tool_decision", "tool_result"]
    tools = km(km_env, "otel", "goose", "--tools")
    assert tools.stdout.splitlines()[1:3] == [
        "12:00:05.000  tool_decision  Bash accept (config)",
        "12:00:06.000  tool_result    Bash ok 120 ms",
    ]
    assert tools.stdout.splitlines()[-1] == "showing 2 of 14"


@needs_root
def test_unreadable_files_are_skipped_and_counted(km_env: dict[str, str], telemetry_dir: Path) -> None:
    spool = write_everything(telemetry_dir)
    broken = spool.root / "logs" / "00000000000000000001-000001.json"
    broken.write_text('{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"')
    (spool.root / "traces" / "00000000000000000002-000001.json").write_text("null")
    result = km(km_env, "otel", "goose", "--json")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"km: 2 unreadable telemetry files skipped (first: {broken})"]
    assert len(json.loads(result.stdout)) == 14


@needs_root
def test_no_telemetry_yet(km_env: dict[str, str], telemetry_dir: Path) -> None:
    result = km(km_env, "otel", "goose")
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr.splitlines() == [f"no telemetry for goose yet (looked in {telemetry_dir})"]
    Spool(telemetry_dir)  # the directories exist, still empty
    as_json = km(km_env, "otel", "goose", "--json")
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])
    assert "no telemetry for goose yet" in as_json.stderr


def test_an_unknown_sandbox_is_one_line_and_exit_1(km_env: dict[str, str]) -> None:
    result = km(km_env, "otel", "no-such-sandbox")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("km: ") and "no-such-sandbox" in line
    assert result.stdout == ""


def test_timeline_and_json_do_not_go_together(km_env: dict[str, str]) -> None:
    result = km(km_env, "otel", "goose", "--timeline", "--json")
    assert result.returncode == 2
    assert "--timeline and --json" in result.stderr


def test_a_ref_is_required(km_env: dict[str, str]) -> None:
    result = km(km_env, "otel")
    assert result.returncode == 2
    assert "Missing argument 'REF'" in result.stderr


@pytest.mark.parametrize("record", [sandbox_record("stopped"), sandbox_record("running", leader_pid="999999999")])
def test_flush_is_skipped_quietly_when_the_sandbox_cannot_be_reached(tmp_path: Path, record: SandboxRecord) -> None:
    """A stopped sandbox, or one recorded running whose machine is gone: no flush, and no error either."""
    store = SQLiteStateStore(tmp_path / "state.db")
    substrate = LocalSubstrate(store, root=tmp_path / "sandboxes")
    assert request_flush(substrate, record) is False
