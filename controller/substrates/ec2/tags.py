"""Which sandbox a resource belongs to, written on the resource itself.

Every EC2 and IAM resource of a sandbox carries the same tags, and every step looks its resource up
by them before creating one, so re-running after a crash at any point finds what the last run made
instead of making a second one. The tags are the record: nothing is remembered between runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

SANDBOX_ID_TAG = "km:sandbox-id"
PROFILE_TAG = "km:profile"
PLAN_HASH_TAG = "km:plan-hash"
PREFIX_TAG = "km:resource-prefix"
NAME_TAG = "Name"

Tag = dict[str, str]
Filter = dict[str, Any]
TaggedKind = Literal["instances", "volumes", "security-groups"]

# Each kind's Describe call and where its items are in the answer.
_DESCRIBE = {
    "instances": ("describe_instances", "Reservations"),
    "volumes": ("describe_volumes", "Volumes"),
    "security-groups": ("describe_security_groups", "SecurityGroups"),
}


@dataclass(frozen=True)
class SandboxRef:
    """A sandbox as far as its resources are concerned: its id and the installation's resource prefix."""

    sandbox_id: str
    resource_prefix: str

    @property
    def name(self) -> str:
        """The name of the sandbox's security group, role and instance profile: `<prefix>-<sandbox_id>`."""
        return f"{self.resource_prefix}-{self.sandbox_id}"

    def filters(self, *extra: Filter) -> list[Filter]:
        """EC2 Describe filters matching this sandbox's resources (and `extra`)."""
        return [
            {"Name": f"tag:{SANDBOX_ID_TAG}", "Values": [self.sandbox_id]},
            {"Name": f"tag:{PREFIX_TAG}", "Values": [self.resource_prefix]},
            *extra,
        ]

    def owns(self, tags: Iterable[Mapping[str, str]] | None) -> bool:
        found = tag_dict(tags)
        return found.get(SANDBOX_ID_TAG) == self.sandbox_id and found.get(PREFIX_TAG) == self.resource_prefix


@dataclass(frozen=True)
class SandboxTags(SandboxRef):
    """The full tag set written on a sandbox's resources when they are made or converged."""

    profile: str
    plan_hash: str

    @classmethod
    def for_plan(cls, sandbox_id: str, resource_prefix: str, plan: Mapping[str, Any]) -> SandboxTags:
        return cls(sandbox_id, resource_prefix, str(plan["profile"]["metadata"]["name"]), str(plan["hash"]))

    def tags(self, name: str | None = None, extra: Mapping[str, str] | None = None) -> list[Tag]:
        """The tag list (EC2 and IAM spell tags alike); `name` defaults to the sandbox's resource name."""
        values = {
            SANDBOX_ID_TAG: self.sandbox_id,
            PROFILE_TAG: self.profile,
            PLAN_HASH_TAG: self.plan_hash,
            PREFIX_TAG: self.resource_prefix,
            NAME_TAG: name or self.name,
        }
        values.update(extra or {})
        return [{"Key": key, "Value": value} for key, value in values.items()]

    def tag_specifications(
        self, *resource_types: str, name: str | None = None, extra: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        return [{"ResourceType": kind, "Tags": self.tags(name, extra)} for kind in resource_types]


def tag_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in tags or ()}


def tags_differ(current: Iterable[Mapping[str, str]] | None, wanted: Iterable[Mapping[str, str]]) -> bool:
    """Whether any wanted tag is missing or has another value (tags km does not manage are left alone)."""
    have = tag_dict(current)
    return any(have.get(tag["Key"]) != tag["Value"] for tag in wanted)


def find_by_tag(ec2: Any, kind: TaggedKind, ref: SandboxRef, *extra: Filter) -> list[dict[str, Any]]:
    """The sandbox's resources of one kind, in one Describe call (more only when AWS pages the answer)."""
    operation, key = _DESCRIBE[kind]
    found: list[dict[str, Any]] = []
    for page in ec2.get_paginator(operation).paginate(Filters=ref.filters(*extra)):
        if kind == "instances":
            found += [instance for reservation in page[key] for instance in reservation["Instances"]]
        else:
            found += page[key]
    return found
