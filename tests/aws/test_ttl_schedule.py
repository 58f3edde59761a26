"""A sandbox's TTL schedule in EventBridge Scheduler (moto): one-shot, UTC, no retry, deleted after it
fires, moved in place by an extend, and gone with the sandbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from controller.schedule.ttl import (
    TtlTarget,
    at_expression,
    delete_ttl_schedule,
    ensure_ttl_schedule,
    schedule_name,
    ttl_schedule_time,
)
from tests.aws.conftest import Moto

TARGET = TtlTarget(
    "arn:aws:lambda:us-east-1:123456789012:function:km-ttl-handler", "arn:aws:iam::123456789012:role/km-ttl-scheduler"
)
EXPIRY = datetime(2026, 12, 1, 23, 30, 5, tzinfo=UTC)


def test_the_expression_is_utc_whatever_zone_it_is_given_in() -> None:
    berlin = EXPIRY.astimezone(timezone(timedelta(hours=1)))
    assert at_expression(berlin) == "at(2026-12-01T23:30:05)"


def test_a_ttl_is_a_one_shot_schedule_that_calls_the_handler_once(moto: Moto) -> None:
    name = ensure_ttl_schedule("km", "sb-1234abcd", EXPIRY, TARGET, "us-east-1")

    schedule = moto.client("scheduler").get_schedule(Name=name, GroupName="default")
    assert name == "km-ttl-sb-1234abcd"
    assert schedule["ScheduleExpression"] == "at(2026-12-01T23:30:05)"
    assert schedule["ScheduleExpressionTimezone"] == "UTC"
    assert schedule["FlexibleTimeWindow"] == {"Mode": "OFF"}
    assert schedule["ActionAfterCompletion"] == "DELETE"
    target = schedule["Target"]
    assert (target["Arn"], target["RoleArn"]) == (TARGET.function_arn, TARGET.role_arn)
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 0
    assert json.loads(target["Input"]) == {
        "action": "ttl",
        "sandbox_id": "sb-1234abcd",
        "expires_at": "2026-12-01T23:30:05+00:00",
    }


def test_extend_moves_the_schedule_in_place(moto: Moto) -> None:
    ensure_ttl_schedule("km", "sb-1234abcd", EXPIRY, TARGET, "us-east-1")

    ensure_ttl_schedule("km", "sb-1234abcd", EXPIRY + timedelta(hours=2), TARGET, "us-east-1")

    schedules = moto.client("scheduler").list_schedules()["Schedules"]
    assert [s["Name"] for s in schedules] == ["km-ttl-sb-1234abcd"]
    assert ttl_schedule_time("km", "sb-1234abcd", "us-east-1") == "at(2026-12-02T01:30:05)"


def test_delete_is_idempotent(moto: Moto) -> None:
    ensure_ttl_schedule("km", "sb-1234abcd", EXPIRY, TARGET, "us-east-1")

    assert delete_ttl_schedule("km", "sb-1234abcd", "us-east-1") is True
    assert delete_ttl_schedule("km", "sb-1234abcd", "us-east-1") is False
    assert ttl_schedule_time("km", "sb-1234abcd", "us-east-1") is None


def test_names_fit_schedulers_limit() -> None:
    assert len(schedule_name("a-long-prefix-xx", "sb-" + "x" * 80)) == 64
