"""A sandbox's TTL on ec2: one EventBridge Scheduler one-shot `at()` schedule, `<prefix>-ttl-<sandbox id>`.

It fires once, in UTC, with no retry (a second teardown attempt later would act on stale intent), and
deletes itself afterwards. Its target is the teardown handler (`controller.lifecycle.handler`, deployed
as a Lambda by `km init`), given the sandbox id and the expiry it was set for, so a handler that fires
after `km extend` moved the TTL can tell the event is stale. `km extend` moves the schedule in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from controller.aws.clients import client, error_code

GROUP = "default"


@dataclass(frozen=True)
class TtlTarget:
    """Where a TTL schedule sends its event: the teardown Lambda and the role Scheduler assumes to call it."""

    function_arn: str
    role_arn: str


def schedule_name(prefix: str, sandbox_id: str) -> str:
    return f"{prefix}-ttl-{sandbox_id}"[:64]


def at_expression(moment: datetime) -> str:
    """`at(YYYY-MM-DDTHH:MM:SS)` in UTC, as Scheduler expects for one-shot schedules."""
    return f"at({moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S})"


def ensure_ttl_schedule(prefix: str, sandbox_id: str, expiry: datetime, target: TtlTarget, region: str) -> str:
    """Create the schedule, or move it to `expiry` when it exists (`km extend`); returns its name."""
    scheduler = client("scheduler", region)
    name = schedule_name(prefix, sandbox_id)
    arguments = {
        "Name": name,
        "GroupName": GROUP,
        "ScheduleExpression": at_expression(expiry),
        "ScheduleExpressionTimezone": "UTC",
        "FlexibleTimeWindow": {"Mode": "OFF"},
        "ActionAfterCompletion": "DELETE",
        "State": "ENABLED",
        "Description": f"km: TTL of sandbox {sandbox_id}",
        "Target": {
            "Arn": target.function_arn,
            "RoleArn": target.role_arn,
            "Input": json.dumps({"action": "ttl", "sandbox_id": sandbox_id, "expires_at": expiry.astimezone(UTC).isoformat()}),
            "RetryPolicy": {"MaximumRetryAttempts": 0},
        },
    }
    try:
        scheduler.create_schedule(**arguments)
    except Exception as error:
        if error_code(error) != "ConflictException":
            raise
        scheduler.update_schedule(**arguments)
    return name


def delete_ttl_schedule(prefix: str, sandbox_id: str, region: str) -> bool:
    """Remove the schedule; False when there was none (already fired, or never set)."""
    try:
        client("scheduler", region).delete_schedule(Name=schedule_name(prefix, sandbox_id), GroupName=GROUP)
    except Exception as error:
        if error_code(error) == "ResourceNotFoundException":
            return False
        raise
    return True


def ttl_schedule_time(prefix: str, sandbox_id: str, region: str) -> str | None:
    """The schedule's `at(...)` expression, or None when there is no schedule."""
    try:
        found = client("scheduler", region).get_schedule(Name=schedule_name(prefix, sandbox_id), GroupName=GROUP)
    except Exception as error:
        if error_code(error) == "ResourceNotFoundException":
            return None
        raise
    return str(found["ScheduleExpression"])
