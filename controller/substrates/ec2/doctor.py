"""`km doctor --ec2`: find (and with --fix remove) what ec2 sandboxes left in the account.

Every resource of a sandbox carries its id: EC2 resources in the `km:sandbox-id` tag (under the
installation's `km:resource-prefix`), IAM roles and instance profiles in their name
`<prefix>-<sandbox_id>`, TTL schedules in theirs, `<prefix>-ttl-<sandbox_id>`. A create writes its
record before it makes anything and a destroy deletes the record last, so a resource whose sandbox has
no record is an orphan: a create that died while rolling back, a record deleted by hand, a teardown
that could not finish.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.aws.clients import client
from controller.schedule.ttl import delete_ttl_schedule, schedule_name
from controller.substrates.ec2.tags import PREFIX_TAG, SANDBOX_ID_TAG, tag_dict
from controller.substrates.ec2.teardown import NOT_TERMINATED, destroy_all

SANDBOX_ID = r"[a-z][a-z0-9]{0,11}-[a-f0-9]{8}"


@dataclass(frozen=True)
class Orphan:
    kind: str  # instance, volume, security-group, role, instance-profile, schedule
    sandbox_id: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "sandbox_id": self.sandbox_id, "detail": self.detail}


def find_orphans(region: str, prefix: str, known: Iterable[str]) -> list[Orphan]:
    """Every resource of this installation whose sandbox id is not in `known` (the recorded sandboxes)."""
    recorded = set(known)
    found = [orphan for orphan in _tagged(region, prefix) + _named(region, prefix) if orphan.sandbox_id not in recorded]
    return sorted(found, key=lambda orphan: (orphan.sandbox_id, orphan.kind, orphan.detail))


def fix(region: str, prefix: str, orphans: Iterable[Orphan]) -> None:
    """Tear down each orphaned sandbox whole (the same teardown as `km destroy`), schedule first."""
    for sandbox_id in sorted({orphan.sandbox_id for orphan in orphans}):
        delete_ttl_schedule(prefix, sandbox_id, region)
        destroy_all(sandbox_id, region, prefix)


def _tagged(region: str, prefix: str) -> list[Orphan]:
    ec2 = client("ec2", region)
    by_prefix = {"Name": f"tag:{PREFIX_TAG}", "Values": [prefix]}
    found: list[Orphan] = []
    live = {"Name": "instance-state-name", "Values": list(NOT_TERMINATED)}
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[by_prefix, live]):
        for reservation in page["Reservations"]:
            found += [_orphan("instance", item, item["InstanceId"]) for item in reservation["Instances"]]
    for page in ec2.get_paginator("describe_volumes").paginate(Filters=[by_prefix]):
        found += [_orphan("volume", item, item["VolumeId"]) for item in page["Volumes"]]
    for page in ec2.get_paginator("describe_security_groups").paginate(Filters=[by_prefix]):
        found += [_orphan("security-group", item, item["GroupId"]) for item in page["SecurityGroups"]]
    return [orphan for orphan in found if orphan.sandbox_id]


def _orphan(kind: str, item: dict[str, Any], detail: str) -> Orphan:
    return Orphan(kind, tag_dict(item.get("Tags")).get(SANDBOX_ID_TAG, ""), detail)


def _named(region: str, prefix: str) -> list[Orphan]:
    resource = re.compile(rf"{re.escape(prefix)}-({SANDBOX_ID})")
    schedule = re.compile(re.escape(schedule_name(prefix, "")) + f"({SANDBOX_ID})")
    iam, scheduler = client("iam", region), client("scheduler", region)
    names = [
        ("role", resource, [item["RoleName"] for page in iam.get_paginator("list_roles").paginate() for item in page["Roles"]]),
        (
            "instance-profile",
            resource,
            [
                item["InstanceProfileName"]
                for page in iam.get_paginator("list_instance_profiles").paginate()
                for item in page["InstanceProfiles"]
            ],
        ),
        (
            "schedule",
            schedule,
            [
                item["Name"]
                for page in scheduler.get_paginator("list_schedules").paginate(NamePrefix=schedule_name(prefix, ""))
                for item in page["Schedules"]
            ],
        ),
    ]
    matches = [(kind, pattern.fullmatch(name), name) for kind, pattern, listed in names for name in listed]
    return [Orphan(kind, match.group(1), name) for kind, match, name in matches if match]
