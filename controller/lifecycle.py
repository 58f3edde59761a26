"""The teardown handler: what a sandbox's TTL schedule runs when it fires (deployed as a Lambda by `km init`).

It applies the sandbox's teardown policy (`destroy`, `stop`, `retain`) unless the event is stale: the
record's TTL was moved past the time this schedule was set for (`km extend` raced the firing), or the
sandbox is locked, or already gone. Every decision is returned (and logged), so an operator reading the
Lambda's log sees why nothing happened as clearly as what did. Artifacts in S3 are always kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("km.lifecycle")
STALE_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class HandlerSettings:
    region: str
    prefix: str
    sandboxes_table: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HandlerSettings:
        env = os.environ if env is None else env
        prefix = env.get("KM_RESOURCE_PREFIX", "km")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(region, prefix, env.get("KM_SANDBOXES_TABLE") or f"{prefix}-sandboxes")


def handler(event: Mapping[str, Any], context: object = None) -> dict[str, Any]:
    """Lambda entry point; `context` is unused."""
    outcome = apply_ttl(event, HandlerSettings.from_env())
    log.info("ttl event handled: %s", outcome)
    return outcome


def apply_ttl(event: Mapping[str, Any], settings: HandlerSettings, now: datetime | None = None) -> dict[str, Any]:
    from controller.schedule.ttl import delete_ttl_schedule
    from controller.state import SandboxNotFound
    from controller.state.dynamodb import DynamoDBStateStore

    sandbox_id = str(event.get("sandbox_id", ""))
    if event.get("action") != "ttl" or not sandbox_id:
        return {"done": "nothing", "reason": f"not a TTL event: {dict(event)}"}
    store = DynamoDBStateStore(settings.sandboxes_table, settings.region)
    try:
        record = store.get(sandbox_id)
    except SandboxNotFound:
        delete_ttl_schedule(settings.prefix, sandbox_id, settings.region)
        return {"sandbox_id": sandbox_id, "done": "nothing", "reason": "no such sandbox"}
    set_for = _parse_time(event.get("expires_at"))
    if record.ttl_expiry is None or (set_for is not None and record.ttl_expiry > set_for + STALE_AFTER):
        return {"sandbox_id": sandbox_id, "done": "nothing", "reason": "stale: the TTL was moved or removed"}
    if record.ttl_expiry > (now or datetime.now(UTC)) + STALE_AFTER:
        return {"sandbox_id": sandbox_id, "done": "nothing", "reason": "early: the TTL is still ahead"}
    if record.locked:
        return {"sandbox_id": sandbox_id, "done": "nothing", "reason": "locked"}
    if record.teardown_policy == "retain":
        return {"sandbox_id": sandbox_id, "done": "nothing", "reason": "teardownPolicy: retain"}
    if record.teardown_policy == "stop":
        return _stop(store, record, settings)
    return _destroy(store, record, settings)


def _stop(store: Any, record: Any, settings: HandlerSettings) -> dict[str, Any]:
    from controller.substrates.ec2 import SandboxRef, find_instance, stop_instance

    instance = find_instance(settings.region, SandboxRef(record.sandbox_id, settings.prefix))
    if instance is not None and instance.state in ("pending", "running"):
        stop_instance(settings.region, instance.instance_id, hibernate=False)
    store.update(record.sandbox_id, status="stopped")
    return {"sandbox_id": record.sandbox_id, "done": "stopped"}


def _destroy(store: Any, record: Any, settings: HandlerSettings) -> dict[str, Any]:
    from controller.schedule.ttl import delete_ttl_schedule
    from controller.substrates.ec2 import destroy_all

    store.update(record.sandbox_id, status="destroying")
    removed = destroy_all(record.sandbox_id, settings.region, settings.prefix)
    store.delete(record.sandbox_id)
    delete_ttl_schedule(settings.prefix, record.sandbox_id, settings.region)
    return {"sandbox_id": record.sandbox_id, "done": "destroyed", "removed": str(removed)}


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return None
