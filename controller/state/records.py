"""What km remembers about one sandbox: a frozen record that stores read and write whole.

Timestamps are always tz-aware and kept in UTC, so records written by one operator's machine read the
same on another's; `as_json` is the shape `km list --json` prints.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer, field_validator

# nocap: the cloud had no capacity for it (ec2); kept, with the reason, until `km destroy` or a new create.
SandboxStatus = Literal["starting", "running", "stopped", "paused", "failed", "nocap", "destroying"]
Substrate = Literal["ec2", "local"]
TeardownPolicy = Literal["destroy", "stop", "retain"]


class SandboxRecord(BaseModel):
    """One sandbox as the state store knows it; `number` is assigned by the store at insert."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sandbox_id: str = Field(min_length=1)
    alias: str
    profile: str
    profile_file: str | None
    substrate: Substrate
    region: str
    status: SandboxStatus
    plan_hash: str
    runtime_hash: str
    policy_hash: str
    created_at: AwareDatetime
    updated_at: AwareDatetime
    ttl_expiry: AwareDatetime | None
    idle_timeout_seconds: int | None = Field(gt=0)
    teardown_policy: TeardownPolicy
    locked: bool = False
    failure_reason: str | None = None
    # Substrate handles: machine directory, netns, veth, address, instance id…
    resources: dict[str, str] = Field(default_factory=dict)
    number: int | None = Field(None, ge=1)

    @field_validator("alias")
    @classmethod
    def _alias_is_a_name(cls, alias: str) -> str:
        # `#3` always means list number 3, so an alias may not start with '#'.
        if not alias or alias.startswith("#") or any(char.isspace() for char in alias):
            raise ValueError(f"{alias!r}: an alias is a non-empty name without spaces that does not start with '#'")
        return alias

    @field_validator("created_at", "updated_at", "ttl_expiry")
    @classmethod
    def _in_utc(cls, moment: datetime | None) -> datetime | None:
        return None if moment is None else moment.astimezone(UTC)

    @field_serializer("created_at", "updated_at", "ttl_expiry", when_used="json")
    def _timestamp_text(self, moment: datetime | None) -> str | None:
        return None if moment is None else utc_text(moment)

    def as_json(self) -> dict[str, Any]:
        """The record as `km list --json` prints it: `id` for `sandbox_id`, ISO-8601 `Z` timestamps."""
        data = self.model_dump(mode="json")
        return {"id": data.pop("sandbox_id"), **data}


def utc_text(moment: datetime) -> str:
    """`2025-05-01T12:00:00Z`: ISO-8601 in UTC with a `Z`, microseconds only when there are any."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_utc_text(text: str) -> datetime:
    """The inverse of `utc_text`; a timestamp without a zone is refused rather than guessed."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return moment.astimezone(UTC)
