"""The record a new sandbox starts with, read from its compiled plan: the same for every substrate."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.state import SandboxRecord, new_sandbox_id
from controller.state.records import Substrate


def starting_record(
    plan: dict[str, Any], alias: str, profile_file: str | None, substrate: Substrate, resources: dict[str, str]
) -> SandboxRecord:
    """A `starting` record with a fresh id, the plan's hashes and lifecycle, and this process as its
    creator (`creator_pid`: convergence tells a create in progress from one that was killed)."""
    lifecycle = plan["hostAgent"]["lifecycle"]
    now = datetime.now(UTC)
    return SandboxRecord(
        sandbox_id=new_sandbox_id(plan["sandbox"]["prefix"]),
        alias=alias,
        profile=plan["profile"]["metadata"]["name"],
        profile_file=profile_file,
        substrate=substrate,
        region=plan["sandbox"]["region"],
        status="starting",
        plan_hash=plan["hash"],
        runtime_hash=plan["hashes"]["runtime"],
        policy_hash=plan["hashes"]["policy"],
        created_at=now,
        updated_at=now,
        ttl_expiry=now + timedelta(seconds=lifecycle["ttl_seconds"]) if lifecycle["ttl_seconds"] else None,
        idle_timeout_seconds=lifecycle["idle_timeout_seconds"],
        teardown_policy=lifecycle["teardown_policy"],
        resources={"creator_pid": str(os.getpid()), **resources},
    )


def policy_changes(record: SandboxRecord, plan: dict[str, Any]) -> dict[str, Any]:
    """The record's fields after a live policy update: the new hashes and lifecycle (the TTL still counts
    from the sandbox's creation, as when it was made with this plan)."""
    lifecycle = plan["hostAgent"]["lifecycle"]
    ttl = lifecycle["ttl_seconds"]
    return {
        "plan_hash": plan["hash"],
        "policy_hash": plan["hashes"]["policy"],
        "ttl_expiry": record.created_at + timedelta(seconds=ttl) if ttl else None,
        "idle_timeout_seconds": lifecycle["idle_timeout_seconds"],
        "teardown_policy": lifecycle["teardown_policy"],
    }
