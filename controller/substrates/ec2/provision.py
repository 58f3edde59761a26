"""Converge one sandbox's EC2 and IAM resources to its compiled plan, in dependency order.

Each step finds its resource by tag or name before making it, so a run after a crash at any point
finishes the job with one of everything. A run with nothing to do reads five times (the instance, the
role and its policy, the VPC, the security group) and writes nothing: the image, subnets and instance
profile are only looked at when an instance has to be launched, and an attached data volume shows in
the instance's own description.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.aws.config import OperatorConfig
from controller.compiler.iam import render_iam_policy
from controller.substrates.ec2.errors import Ec2Error
from controller.substrates.ec2.iam import ensure_instance_profile, ensure_role
from controller.substrates.ec2.images import Image, resolve_ami
from controller.substrates.ec2.instances import PROFILE_POLLING, Instance, find_instance, launch_instance
from controller.substrates.ec2.network import Subnet, Vpc, ensure_security_group, find_subnets, find_vpc
from controller.substrates.ec2.polling import Polling
from controller.substrates.ec2.shape import Ec2Plan, ec2_plan
from controller.substrates.ec2.tags import SandboxTags
from controller.substrates.ec2.userdata import sandbox_userdata
from controller.substrates.ec2.volumes import VOLUME_POLLING, ensure_data_volume, find_data_volume


@dataclass(frozen=True)
class SandboxResources:
    """What a sandbox has in AWS after a converging run."""

    sandbox_id: str
    security_group_id: str
    role_arn: str
    instance_profile_arn: str
    instance: Instance
    data_volume_ids: tuple[str, ...]
    launched: bool  # this run launched the instance (otherwise it was found, in `instance.state`)


def sandbox_identity(
    tags: SandboxTags, region: str, vpc: Vpc, artifacts_bucket: str, config: OperatorConfig, alias: str | None = None
) -> dict[str, str]:
    """The sandbox's /etc/km/sandbox.env (see `host_agent.config.load_identity`)."""
    identity = {
        "KM_SANDBOX_ID": tags.sandbox_id,
        "KM_REGION": region,
        "KM_RESOURCE_PREFIX": tags.resource_prefix,
        "KM_ARTIFACTS_URI": f"s3://{artifacts_bucket}",
        "KM_DNS_UPSTREAM": vpc.resolver,  # the only DNS server the security group lets it reach
    }
    if alias:
        identity["KM_ALIAS"] = alias
    if config.efs_id:
        identity["KM_EFS_ID"] = config.efs_id
    if config.pip_index_url:
        identity["KM_PIP_INDEX_URL"] = config.pip_index_url  # read by install-host-agent.sh
    return identity


def ensure_sandbox(
    region: str,
    tags: SandboxTags,
    plan: Mapping[str, Any],
    userdata: str,
    *,
    artifacts_bucket: str,
    config: OperatorConfig,
    alias: str | None = None,
    boot_env: Callable[[Image], Mapping[str, str]] | None = None,
    polling: Polling | None = None,
) -> SandboxResources:
    """Role, instance profile, security group, instance and data volumes for `plan`, made or found.

    `userdata` is the compiled userdata.sh; the instance boots it after its identity (plus what
    `boot_env` gives for the chosen image, asked only when an instance is launched: the host agent
    bundle's URL) is written. An instance that already exists is kept whatever plan it was
    launched from (`instance.plan_hash`): replacing it is the caller's decision. `polling` overrides
    every wait (tests).
    """
    shape = ec2_plan(plan)
    if shape.mounts_efs and not config.efs_id:
        raise Ec2Error(
            "the profile mounts EFS (spec.runtime.mountEFS) but the km configuration has no efs_id; run km init or set efs_id"
        )
    instance = find_instance(region, tags)
    policy = render_iam_policy(plan["iamPolicy"], tags.sandbox_id, artifacts_bucket)
    role_arn = ensure_role(region, tags, policy, shape.role_session_seconds)
    profile_arn = _profile_in_use(instance, tags.name) or ensure_instance_profile(region, tags, tags.name)
    vpc = find_vpc(region, config)
    group_id = ensure_security_group(region, tags, vpc, shape.egress)
    launched = instance is None
    if instance is None:
        image = resolve_ami(region, shape.ami, shape.instance_type)
        subnet = _subnet_for(region, tags, shape, find_subnets(region, vpc, config))
        identity = sandbox_identity(tags, region, vpc, artifacts_bucket, config, alias)
        identity |= dict(boot_env(image)) if boot_env is not None else {}
        instance = launch_instance(
            region,
            tags,
            shape,
            image,
            subnet.subnet_id,
            group_id,
            profile_arn,
            sandbox_userdata(userdata, identity),
            artifacts_bucket,
            polling or PROFILE_POLLING,
        )
    volume_ids = tuple(
        ensure_data_volume(region, tags, instance, volume, polling or VOLUME_POLLING) for volume in shape.data_volumes
    )
    return SandboxResources(tags.sandbox_id, group_id, role_arn, profile_arn, instance, volume_ids, launched)


def _profile_in_use(instance: Instance | None, profile_name: str) -> str | None:
    """The instance's profile ARN when it is the sandbox's: then the profile exists and need not be read."""
    arn = instance.instance_profile_arn if instance is not None else None
    return arn if arn is not None and arn.endswith(f":instance-profile/{profile_name}") else None


def _subnet_for(region: str, tags: SandboxTags, shape: Ec2Plan, subnets: list[Subnet]) -> Subnet:
    """The first subnet, unless a data volume left by an earlier instance pins the zone (EBS cannot move zones)."""
    for volume in shape.data_volumes:
        found = find_data_volume(region, tags, volume.device)
        if found is None:
            continue
        zone = found["AvailabilityZone"]
        in_zone = [subnet for subnet in subnets if subnet.availability_zone == zone]
        if not in_zone:
            raise Ec2Error(
                f"{tags.sandbox_id}'s {volume.mount_point} volume is in {zone}, where km has no subnet; add one to subnet_ids"
            )
        return in_zone[0]
    return subnets[0]
