"""The teardown handler a TTL schedule runs, against moto: it applies the sandbox's teardownPolicy, and
does nothing (saying why) for a stale, early, locked, retained or vanished sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.aws.config import OperatorConfig
from controller.lifecycle import HandlerSettings, apply_ttl
from controller.schedule.ttl import TtlTarget, ensure_ttl_schedule, ttl_schedule_time
from controller.state.dynamodb import DynamoDBStateStore, ensure_tables
from controller.substrates.ec2 import ensure_sandbox
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import (
    BUCKET,
    FAST,
    NOTHING_TAGGED,
    SANDBOX_ID,
    compiled,
    make_bucket,
    only_instance,
    operator_config,
    sandbox_tags,
    tagged,
)
from tests.unit.controller.state.conftest import new_record

SETTINGS = HandlerSettings(REGION, "km", "km-sandboxes")
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
TARGET = TtlTarget(
    "arn:aws:lambda:us-east-1:123456789012:function:km-ttl-handler", "arn:aws:iam::123456789012:role/km-ttl-scheduler"
)


def sandbox(moto: Moto, **record: Any) -> DynamoDBStateStore:
    """A provisioned goose sandbox whose TTL ran out at NOW, its record and its schedule."""
    make_bucket(moto)
    ensure_tables(OperatorConfig(), REGION)
    goose = compiled()
    ensure_sandbox(
        REGION, sandbox_tags(goose), goose.plan, goose.userdata, artifacts_bucket=BUCKET, config=operator_config(), polling=FAST
    )
    store = DynamoDBStateStore("km-sandboxes", REGION)
    fields = {"substrate": "ec2", "region": REGION, "status": "running", "ttl_expiry": NOW} | record
    store.insert(new_record("goose", sandbox_id=SANDBOX_ID, **fields))
    ensure_ttl_schedule("km", SANDBOX_ID, fields["ttl_expiry"] or NOW, TARGET, REGION)
    return store


def event(expires_at: datetime = NOW) -> dict[str, str]:
    return {"action": "ttl", "sandbox_id": SANDBOX_ID, "expires_at": expires_at.isoformat()}


def test_destroy_removes_every_resource_the_record_and_the_schedule(moto: Moto) -> None:
    store = sandbox(moto)

    outcome = apply_ttl(event(), SETTINGS, now=NOW)

    assert outcome["done"] == "destroyed"
    assert tagged(moto) == NOTHING_TAGGED
    assert store.find_by_alias("goose") is None
    assert ttl_schedule_time("km", SANDBOX_ID, REGION) is None


def test_stop_policy_stops_the_instance_and_keeps_everything(moto: Moto) -> None:
    store = sandbox(moto, teardown_policy="stop")

    assert apply_ttl(event(), SETTINGS, now=NOW)["done"] == "stopped"

    assert only_instance(moto)["State"]["Name"] in ("stopping", "stopped")
    assert store.get(SANDBOX_ID).status == "stopped"


@pytest.mark.parametrize(
    ("record", "fired_for", "reason"),
    [
        ({"ttl_expiry": NOW + timedelta(hours=2)}, NOW, "stale"),  # km extend moved it after this was set
        ({"ttl_expiry": NOW + timedelta(hours=2)}, NOW + timedelta(hours=2), "early"),
        ({"locked": True}, NOW, "locked"),
        ({"teardown_policy": "retain"}, NOW, "retain"),
    ],
)
def test_nothing_is_done_when_it_should_not_be(moto: Moto, record: dict[str, Any], fired_for: datetime, reason: str) -> None:
    store = sandbox(moto, **record)

    outcome = apply_ttl(event(fired_for), SETTINGS, now=NOW)

    assert outcome["done"] == "nothing" and reason in outcome["reason"]
    assert only_instance(moto)["State"]["Name"] in ("pending", "running")
    assert store.get(SANDBOX_ID).status == "running"


def test_a_sandbox_already_gone_just_loses_its_schedule(moto: Moto) -> None:
    store = sandbox(moto)
    store.delete(SANDBOX_ID)

    assert apply_ttl(event(), SETTINGS, now=NOW) == {"sandbox_id": SANDBOX_ID, "done": "nothing", "reason": "no such sandbox"}
    assert ttl_schedule_time("km", SANDBOX_ID, REGION) is None


def test_other_events_are_refused() -> None:
    assert apply_ttl({"action": "idle"}, SETTINGS)["done"] == "nothing"
