"""Telemetry reaches S3 (a real moto server on 127.0.0.1) under `<prefix>/telemetry/<sandbox>/<signal>/`,
and waits in the spool while S3 is down."""

from __future__ import annotations

from pathlib import Path

from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.outbox import target_for
from host_agent.telemetry import request_from_json
from host_agent.telemetry.component import Observability
from tests.unit.host_agent.outbox.helpers import BUCKET, SANDBOX_ID, MotoServer
from tests.unit.host_agent.test_config import minimal_document

PREFIX = "team-a"


def observability(tmp_path: Path) -> Observability:
    config = HostAgentConfig.model_validate({**minimal_document(), "profile": "goose", "substrate": "ec2"})
    return Observability(
        config,
        SandboxIdentity(sandbox_id=SANDBOX_ID),
        tmp_path / "state",
        upload_target=target_for(f"s3://{BUCKET}/{PREFIX}/"),
        receiver_port=0,
        metric_export_interval_seconds=3600,
    )


def test_events_land_in_s3_and_wait_while_it_is_down(tmp_path: Path, moto_server: MotoServer) -> None:
    running = observability(tmp_path)
    events = running.start()
    try:
        events.gate(decision="denied", address="192.0.2.9", port=443, protocol="tcp", pid=5, process="curl")
        assert running.flush()["shipped"] is True
        logs = [key for key in moto_server.keys() if key.startswith(f"{PREFIX}/telemetry/{SANDBOX_ID}/logs/")]
        [uploaded] = logs
        request = request_from_json("logs", moto_server.read(uploaded))
        [record] = request.resource_logs[0].scope_logs[0].log_records  # type: ignore[attr-defined]
        assert record.event_name == "gate"

        moto_server.stop()
        events.dns(name="a.test", qtype="A", decision="denied", rcode="NXDOMAIN", addresses=[])
        assert running.flush()["shipped"] is False
        assert running.shipper is not None and running.shipper.pending() >= 1
    finally:
        running.stop()
