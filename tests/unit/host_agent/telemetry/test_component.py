"""The daemon's telemetry wired together for real: events and agents' OTLP into the spool, shipped to the
artifacts store; or everything to an operator's collector (a real HTTP server here) with its headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.outbox.targets import DirectoryTarget
from host_agent.runs.layout import ENDED_AT, RESULT, STARTED_AT, STATUS, runs_root
from host_agent.telemetry import request_from_json
from host_agent.telemetry.component import Destination, Observability, load_destination, parse_headers
from tests.unit.host_agent.telemetry.helpers import CollectorStub, attributes_of, claude_code_logs_request, post
from tests.unit.host_agent.test_config import minimal_document

SANDBOX = "sb-telemetry1"


def config(substrate: str = "ec2") -> HostAgentConfig:
    return HostAgentConfig.model_validate({**minimal_document(), "profile": "goose", "substrate": substrate})


def logged_events(files: list[Path]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource attributes, record attributes) of every log record in these OTLP/JSON files."""
    found = []
    for file in files:
        request = request_from_json("logs", file.read_text())
        for resource_logs in request.resource_logs:  # type: ignore[attr-defined]
            resource = attributes_of(resource_logs.resource.attributes)
            for scope in resource_logs.scope_logs:
                found += [(resource, record_attributes(record)) for record in scope.log_records]
    return found


def record_attributes(record: Any) -> dict[str, Any]:
    """Attributes with arrays as lists (attributes_of keeps scalars only)."""
    plain = json_format.MessageToDict(record)
    values: dict[str, Any] = {}
    for item in plain.get("attributes", []):
        value = item["value"]
        if "arrayValue" in value:
            values[item["key"]] = [next(iter(v.values())) for v in value["arrayValue"].get("values", [])]
        else:
            kind, scalar = next(iter(value.items()))
            values[item["key"]] = int(scalar) if kind == "intValue" else scalar
    return values


def uploaded(artifacts: Path, signal: str) -> list[Path]:
    return sorted((artifacts / "telemetry" / SANDBOX / signal).glob("*.json"))


def write_run(working_dir: Path, run_id: str, result: dict[str, Any]) -> Path:
    run = runs_root(working_dir) / run_id
    run.mkdir(parents=True)
    (run / STARTED_AT).write_text("2026-11-27T10:00:00.000Z\n")
    (run / RESULT).write_text(json.dumps(result))
    (run / ENDED_AT).write_text("2026-11-27T10:00:12.500Z\n")
    (run / STATUS).write_text(result["status"] + "\n")
    return run


@pytest.fixture
def observability(tmp_path: Path) -> Any:
    started: list[Observability] = []

    def start(**options: Any) -> Observability:
        running = Observability(
            config(),
            SandboxIdentity(sandbox_id=SANDBOX),
            tmp_path / "state",
            receiver_port=0,
            metric_export_interval_seconds=3600,
            **options,
        )
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_events_and_an_agents_own_telemetry_reach_the_artifacts_store(tmp_path: Path, observability: Any) -> None:
    artifacts = tmp_path / "artifacts"
    running = observability(upload_target=DirectoryTarget(artifacts))
    assert running.events is not None and running.receiver is not None
    running.events.dns(name="api.example.test", qtype="A", decision="allowed", rcode="NOERROR", addresses=["192.0.2.7"])
    running.events.gate(decision="denied", address="192.0.2.7", port=8443, protocol="tcp", pid=41, process="curl")
    running.events.tls(
        time=1_800_000_000.0,
        pid=41,
        process="curl",
        direction="write",
        size=517,
        peer=("192.0.2.7", 443),
        http={"protocol": "http/1.1", "method": "GET", "path": "/v1/x", "host": "api.example.test"},
        payload=None,
    )
    reply = post(running.receiver.port, "/v1/logs", claude_code_logs_request().SerializeToString(), "application/x-protobuf")
    assert reply.status == 200

    assert running.flush() == {"flushed": True, "shipped": True}

    events = logged_events(uploaded(artifacts, "logs"))
    by_name = {record["event.name"]: (resource, record) for resource, record in events}
    assert set(by_name) == {"dns", "gate", "tls", "user_prompt"}
    resource, dns = by_name["dns"]
    assert resource == {
        "service.name": "km-host-agent",
        "km.sandbox.id": SANDBOX,
        "km.profile": "goose",
        "cloud.region": "eu-west-1",
    }
    assert dns == {
        "event.name": "dns",
        "host": "api.example.test",
        "qtype": "A",
        "decision": "allowed",
        "rcode": "NOERROR",
        "addresses": ["192.0.2.7"],
    }
    # The address is named by the answer that gave it out.
    assert by_name["gate"][1] == {
        "event.name": "gate",
        "decision": "denied",
        "host": "api.example.test",
        "address": "192.0.2.7",
        "port": 8443,
        "protocol": "tcp",
        "pid": 41,
        "process": "curl",
    }
    tls = by_name["tls"][1]
    assert (tls["host"], tls["port"], tls["direction"], tls["bytes"], tls["http.method"]) == (
        "api.example.test",
        443,
        "write",
        517,
        "GET",
    )
    assert "payload" not in tls
    # The agent's record keeps its own resource but is stamped with this sandbox, whatever it claimed.
    agent_resource, prompt = by_name["user_prompt"]
    assert agent_resource["km.sandbox.id"] == SANDBOX and agent_resource["service.name"] == "claude-code"
    assert prompt["prompt"] == "fix the failing test"
    assert uploaded(artifacts, "metrics"), "counters are exported on flush"
    assert running.spool is not None and running.shipper is not None and running.shipper.pending() == 0


def test_a_finished_run_is_reported_once_with_a_span_even_across_restarts(tmp_path: Path, observability: Any) -> None:
    artifacts, working_dir = tmp_path / "artifacts", tmp_path / "workspace"
    result = {
        "run_id": "20261127T100000Z-123abc",
        "agent": "claude",
        "status": "complete",
        "exit_code": 0,
        "total_cost_usd": 0.0123,
        "duration_ms": 12_500,
        "session_id": "s-1",
        "usage": {"input_tokens": 1200, "output_tokens": 340},
    }
    write_run(working_dir, result["run_id"], result)
    running = observability(upload_target=DirectoryTarget(artifacts))
    running.report_finished_runs(runs_root(working_dir))
    running.report_finished_runs(runs_root(working_dir))  # nothing new: not reported twice
    running.flush()
    running.stop()
    again = observability(upload_target=DirectoryTarget(artifacts))
    again.report_finished_runs(runs_root(working_dir))  # a restarted daemon remembers what it reported
    again.flush()

    runs = [record for _, record in logged_events(uploaded(artifacts, "logs")) if record["event.name"] == "agent_run"]
    assert runs == [
        {
            "event.name": "agent_run",
            "run_id": "20261127T100000Z-123abc",
            "agent": "claude",
            "status": "complete",
            "exit_code": 0,
            "cost_usd": 0.0123,
            "input_tokens": 1200,
            "output_tokens": 340,
            "duration_s": 12.5,
            "session_id": "s-1",
        }
    ]
    [traces] = uploaded(artifacts, "traces")
    [span] = request_from_json("traces", traces.read_text()).resource_spans[0].scope_spans[0].spans  # type: ignore[attr-defined]
    assert span.name == "agent_run"
    assert (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9 == pytest.approx(12.5)


def test_a_store_that_is_down_keeps_the_files_until_it_is_back(tmp_path: Path, observability: Any) -> None:
    blocked = tmp_path / "artifacts"
    blocked.write_text("a file where the store's directory should be")
    running = observability(upload_target=DirectoryTarget(blocked))
    assert running.events is not None
    running.events.tls_unobserved(pid=7, process="claude", exe="/usr/local/bin/claude", reason="BoringSSL")

    assert running.flush() == {"flushed": True, "shipped": False}
    assert running.shipper is not None and running.shipper.pending() >= 1
    assert running.status()["uploads"]["error"]

    blocked.unlink()
    assert running.flush()["shipped"] is True
    assert running.shipper.pending() == 0 and running.status()["uploads"]["error"] is None
    [(_, record)] = [event for event in logged_events(uploaded(blocked, "logs")) if event[1]["event.name"] == "tls_unobserved"]
    assert record["exe"] == "/usr/local/bin/claude"


def test_an_operator_collector_gets_everything_with_its_headers(tmp_path: Path, observability: Any) -> None:
    working_dir = tmp_path / "workspace"
    write_run(
        working_dir,
        "20261127T100000Z-456def",
        {"run_id": "20261127T100000Z-456def", "agent": "codex", "status": "failed", "total_cost_usd": 0.5},
    )
    with CollectorStub() as collector:
        running = observability(destination=Destination(collector.endpoint, {"x-api-key": "key-for-test"}))
        assert running.events is not None and running.receiver is not None and running.spool is None
        running.events.gate(decision="would_deny", address="198.51.100.9", port=53, protocol="udp", pid=3, process="dig")
        running.report_finished_runs(runs_root(working_dir))
        agent = post(running.receiver.port, "/v1/logs", claude_code_logs_request().SerializeToString(), "application/x-protobuf")
        assert agent.status == 200
        running.flush()
        running.stop()

    assert {captured.headers["x-api-key"] for captured in collector.requests} == {"key-for-test"}
    logs = [ExportLogsServiceRequest.FromString(c.body) for c in collector.requests if c.path == "/v1/logs"]
    services = {}
    for request in logs:
        for resource_logs in request.resource_logs:
            resource = attributes_of(resource_logs.resource.attributes)
            assert resource["km.sandbox.id"] == SANDBOX and resource["km.profile"] == "goose"
            names = [record_attributes(r)["event.name"] for s in resource_logs.scope_logs for r in s.log_records]
            services[resource["service.name"]] = names
    assert services == {"km-host-agent": ["gate", "agent_run"], "claude-code": ["user_prompt"]}
    metrics = [ExportMetricsServiceRequest.FromString(c.body) for c in collector.requests if c.path == "/v1/metrics"]
    points = {
        (m.name, attributes_of(point.attributes).get("pool")): point.as_double or point.as_int
        for request in metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for point in (*m.sum.data_points, *m.gauge.data_points)
    }
    assert points[("km.gate.decisions", None)] == 1
    assert points[("km.budget.spent", "ai")] == 0.5  # the failed run's reported spend
    traces = [ExportTraceServiceRequest.FromString(c.body) for c in collector.requests if c.path == "/v1/traces"]
    [span] = [span for request in traces for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    assert span.name == "agent_run" and attributes_of(span.attributes)["status"] == "failed"
    assert attributes_of(traces[0].resource_spans[0].resource.attributes)["km.sandbox.id"] == SANDBOX


def test_no_region_is_claimed_for_a_local_sandbox(tmp_path: Path) -> None:
    running = Observability(config("local"), SandboxIdentity(sandbox_id=SANDBOX), tmp_path, receiver_port=0)
    events = running.start()
    try:
        events.dns(name="a.test", qtype="A", decision="denied", rcode="NXDOMAIN", addresses=[])
        running.flush()
        assert running.spool is not None
        [(resource, _)] = logged_events(running.spool.files("logs"))
        assert "cloud.region" not in resource
    finally:
        running.stop()


def test_the_collector_comes_from_a_root_only_file(tmp_path: Path) -> None:
    assert load_destination(tmp_path / "absent.env") is None
    file = tmp_path / "telemetry.env"
    file.write_text(
        "# the operator's collector\nKM_OTLP_ENDPOINT=https://otel.example.test:4318/\nKM_OTLP_HEADERS=x-api-key=abc%3D,team=infra\n"
    )
    assert load_destination(file) == Destination("https://otel.example.test:4318", {"x-api-key": "abc=", "team": "infra"})
    file.write_text("KM_OTLP_ENDPOINT=otel.example.test:4318\n")
    with pytest.raises(ValueError, match="KM_OTLP_ENDPOINT .* must be an http:// or https:// URL"):
        load_destination(file)


def test_headers_that_are_not_key_value_are_refused() -> None:
    assert parse_headers("") == {}
    with pytest.raises(ValueError, match="'novalue' is not key=value"):
        parse_headers("a=b,novalue")
