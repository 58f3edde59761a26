"""The record a new sandbox starts with, read from its compiled plan: the same for every substrate."""

from __future__ import annotations

import os
import socket
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
        resources={**creator(), **resources},
    )


# No create takes this long (EC2's waits give up well before): an older `starting` record was interrupted
# even if a process with its creator's pid exists, which by then is another process.
CREATE_GIVES_UP = timedelta(hours=1)


def creator() -> dict[str, str]:
    """Who is creating the sandbox: written on its `starting` record (and again by a run that finishes it)."""
    return {"creator_host": socket.gethostname(), "creator_pid": str(os.getpid())}


def creator_alive(record: SandboxRecord, now: datetime | None = None) -> bool:
    """Whether the process that wrote this `starting` record may still be creating it, so convergence must
    wait rather than finish or replace it. On this host its pid is asked. Another operator's host (ec2
    records are shared) cannot be, so there only the record's age decides."""
    if (now or datetime.now(UTC)) - record.updated_at > CREATE_GIVES_UP:
        return False
    host, pid = record.resources.get("creator_host"), record.resources.get("creator_pid") or ""
    if host not in (None, socket.gethostname()):
        return True
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


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
