"""Remove everything a sandbox has in EC2 and IAM, whatever state a crash or an earlier teardown left.

Order matters: the instance goes first (its network interface holds the security group and its
volumes are attached to it), then volumes, the security group, the instance profile and the role.
Anything already gone is skipped, so running it again is harmless. The artifacts bucket is not touched:
results and the offloaded boot script are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error
from controller.substrates.ec2.iam import delete_instance_profile, delete_role
from controller.substrates.ec2.instances import TERMINATE_POLLING, terminate_and_wait
from controller.substrates.ec2.network import SG_DELETE_POLLING, delete_security_group, find_security_group_ids
from controller.substrates.ec2.polling import Polling
from controller.substrates.ec2.tags import SandboxRef, find_by_tag
from controller.substrates.ec2.volumes import VOLUME_POLLING, delete_volumes

# Every state but terminated: shutting-down instances are waited for too.
NOT_TERMINATED = ("pending", "running", "shutting-down", "stopping", "stopped")


@dataclass(frozen=True)
class Removed:
    """What a teardown removed (ids for EC2, names for IAM)."""

    instances: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    instance_profiles: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    @property
    def nothing(self) -> bool:
        return not (self.instances or self.volumes or self.security_groups or self.instance_profiles or self.roles)


def destroy_all(sandbox_id: str, region: str, prefix: str, polling: Polling | None = None) -> Removed:
    """Terminate the sandbox's instances, then delete its volumes, security group, instance profile and role.

    `polling` overrides every wait (default: each step's own). A step that fails does not stop the
    independent ones after it; the `Ec2Error` raised at the end says what was removed and what is left.
    """
    ref = SandboxRef(sandbox_id, prefix)
    ec2 = client("ec2", region)
    live = find_by_tag(ec2, "instances", ref, {"Name": "instance-state-name", "Values": list(NOT_TERMINATED)})
    instances = terminate_and_wait(region, [item["InstanceId"] for item in live], polling or TERMINATE_POLLING)
    volumes: list[str] = []
    groups: list[str] = []
    profiles: list[str] = []
    roles: list[str] = []
    failures: list[str] = []
    try:
        volumes = delete_volumes(region, ref, polling or VOLUME_POLLING)
    except Exception as error:
        failures.append(f"volumes: {error}")
    try:
        for group_id in find_security_group_ids(region, ref):
            if delete_security_group(region, group_id, polling or SG_DELETE_POLLING):
                groups.append(group_id)
    except Exception as error:
        failures.append(f"security group: {error}")
    try:
        if delete_instance_profile(region, ref):
            profiles.append(ref.name)
    except Exception as error:
        failures.append(f"instance profile: {error}")
    try:
        if delete_role(region, ref):
            roles.append(ref.name)
    except Exception as error:
        failures.append(f"role: {error}")
    removed = Removed(tuple(instances), tuple(volumes), tuple(groups), tuple(profiles), tuple(roles))
    if failures:
        raise TeardownIncomplete(sandbox_id, removed, failures)
    return removed


class TeardownIncomplete(Ec2Error):
    """Some of a sandbox's resources could not be removed; `removed` says what was."""

    def __init__(self, sandbox_id: str, removed: Removed, failures: list[str]) -> None:
        super().__init__(f"destroying {sandbox_id} left resources behind ({'; '.join(failures)}); run the destroy again")
        self.removed = removed
        self.failures = failures
