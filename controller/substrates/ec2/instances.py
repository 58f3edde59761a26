"""The sandbox's instance: launched once, found by tag ever after, and stopped, started or terminated on request.

A launch asks for everything the plan says in one RunInstances call (IMDSv2 only, an encrypted gp3
root, hibernation or spot, tags on the instance, its root volume and any spot request), so there is
no window in which an untagged instance exists. AWS's capacity and limit refusals become
`CapacityError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, aws_message, is_aws_error
from controller.substrates.ec2.images import Image
from controller.substrates.ec2.polling import Polling, wait_for
from controller.substrates.ec2.shape import Ec2Plan
from controller.substrates.ec2.tags import PLAN_HASH_TAG, SandboxRef, SandboxTags, find_by_tag, tag_dict
from controller.substrates.ec2.userdata import needs_offload, offload_userdata

# States of an instance that is still the sandbox's (a second one must not be launched beside it).
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# StopInstances with Hibernate=True refuses these when the instance cannot hibernate (not configured,
# not ready yet after launch, an instance type or spot request that does not support it).
HIBERNATION_UNAVAILABLE_CODES = frozenset({"UnsupportedHibernationConfiguration", "UnsupportedOperation"})
STATE_POLLING = Polling(interval_seconds=2.0, timeout_seconds=300.0)
TERMINATE_POLLING = Polling(interval_seconds=5.0, timeout_seconds=600.0)
# A new instance profile takes a few seconds to become usable by EC2 (IAM is eventually consistent).
PROFILE_POLLING = Polling(interval_seconds=3.0, timeout_seconds=90.0)
StopOutcome = Literal["hibernated", "stopped"]


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: str
    instance_type: str
    image_id: str
    availability_zone: str
    subnet_id: str | None
    instance_profile_arn: str | None
    security_group_ids: tuple[str, ...]
    spot: bool
    hibernation: bool
    launch_time: str
    devices: Mapping[str, str] = field(default_factory=dict)  # device name → attached volume id
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def plan_hash(self) -> str | None:
        """The hash of the plan the instance was launched from."""
        return self.tags.get(PLAN_HASH_TAG)


def instance_from(description: Mapping[str, Any]) -> Instance:
    """An `Instance` from one entry of DescribeInstances/RunInstances."""
    return Instance(
        instance_id=str(description["InstanceId"]),
        state=str(description["State"]["Name"]),
        instance_type=str(description["InstanceType"]),
        image_id=str(description["ImageId"]),
        availability_zone=str(description["Placement"]["AvailabilityZone"]),
        subnet_id=description.get("SubnetId"),
        instance_profile_arn=(description.get("IamInstanceProfile") or {}).get("Arn"),
        security_group_ids=tuple(group["GroupId"] for group in description.get("SecurityGroups", [])),
        spot=description.get("InstanceLifecycle") == "spot",
        hibernation=bool((description.get("HibernationOptions") or {}).get("Configured")),
        launch_time=str(description.get("LaunchTime", "")),
        devices={
            mapping["DeviceName"]: mapping["Ebs"]["VolumeId"]
            for mapping in description.get("BlockDeviceMappings", [])
            if "Ebs" in mapping
        },
        tags=tag_dict(description.get("Tags")),
    )


def find_instance(region: str, ref: SandboxRef) -> Instance | None:
    """The sandbox's live (pending, running, stopping or stopped) instance, in one DescribeInstances call.

    Should two exist (two creates racing), the earliest launched is the sandbox's; teardown removes all.
    """
    found = find_by_tag(client("ec2", region), "instances", ref, {"Name": "instance-state-name", "Values": list(LIVE_STATES)})
    if not found:
        return None
    return min((instance_from(item) for item in found), key=lambda instance: (instance.launch_time, instance.instance_id))


def describe_instance(region: str, instance_id: str) -> Instance | None:
    """The instance as EC2 sees it now (state included), or None when EC2 no longer knows it."""
    try:
        reservations = client("ec2", region).describe_instances(InstanceIds=[instance_id])["Reservations"]
    except Exception as error:
        if is_aws_error(error, "InvalidInstanceID.NotFound"):
            return None
        raise
    found = [item for reservation in reservations for item in reservation["Instances"]]
    return instance_from(found[0]) if found else None


def ensure_instance(
    region: str,
    tags: SandboxTags,
    plan: Ec2Plan,
    image: Image,
    subnet_id: str,
    security_group_id: str,
    instance_profile_arn: str,
    userdata: str,
    artifacts_bucket: str | None = None,
    polling: Polling = PROFILE_POLLING,
) -> Instance:
    """The sandbox's live instance if it has one (in whatever state), else a newly launched one."""
    existing = find_instance(region, tags)
    if existing is not None:
        return existing
    return launch_instance(
        region, tags, plan, image, subnet_id, security_group_id, instance_profile_arn, userdata, artifacts_bucket, polling
    )


def launch_request(
    tags: SandboxTags,
    plan: Ec2Plan,
    image: Image,
    subnet_id: str,
    security_group_id: str,
    instance_profile_arn: str,
    userdata: str,
) -> dict[str, Any]:
    """The RunInstances parameters for the plan (pure; user data already within EC2's limit)."""
    root_ebs: dict[str, Any] = {"VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}
    if plan.root_size_gib:
        root_ebs["VolumeSize"] = plan.root_size_gib
    tag_specifications = tags.tag_specifications("instance") + tags.tag_specifications("volume", name=f"{tags.name}-root")
    request: dict[str, Any] = {
        "ImageId": image.image_id,
        "InstanceType": plan.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "SubnetId": subnet_id,
        "SecurityGroupIds": [security_group_id],
        "IamInstanceProfile": {"Arn": instance_profile_arn},
        "UserData": userdata,  # botocore base64-encodes it
        # The image's own root device when known (a literal ami-…); a wrong name would add a second, empty disk.
        "BlockDeviceMappings": [{"DeviceName": image.root_device or plan.root_device, "Ebs": root_ebs}],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
    }
    if plan.hibernation:
        request["HibernationOptions"] = {"Configured": True}
    if plan.spot:
        request["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
        }
        tag_specifications += tags.tag_specifications("spot-instances-request")
    request["TagSpecifications"] = tag_specifications
    return request


def launch_instance(
    region: str,
    tags: SandboxTags,
    plan: Ec2Plan,
    image: Image,
    subnet_id: str,
    security_group_id: str,
    instance_profile_arn: str,
    userdata: str,
    artifacts_bucket: str | None = None,
    polling: Polling = PROFILE_POLLING,
) -> Instance:
    """Launch the instance (no lookup first: `ensure_instance` does that). Oversized user data goes to S3 first."""
    if needs_offload(userdata):
        if not artifacts_bucket:
            raise Ec2Error(
                f"the boot script of {tags.sandbox_id} exceeds EC2's 16 KB user data limit and no artifacts bucket was given"
            )
        userdata = offload_userdata(region, artifacts_bucket, tags.sandbox_id, userdata)
    request = launch_request(tags, plan, image, subnet_id, security_group_id, instance_profile_arn, userdata)
    ec2 = client("ec2", region)
    what = f"launching {plan.instance_type} for {tags.sandbox_id}"

    def attempt() -> dict[str, Any] | None:
        # botocore resends these same parameters when a response is lost: with the token, EC2 then answers
        # with the instance it already launched instead of launching a second one.
        token = f"{tags.sandbox_id}-{uuid.uuid4().hex}"[:64]
        try:
            return dict(ec2.run_instances(**request, ClientToken=token)["Instances"][0])
        except Exception as error:
            if instance_profile_not_visible(error):
                return None
            if is_aws_error(error):
                raise as_ec2_error(error, what) from None
            raise

    return instance_from(wait_for(attempt, f"instance profile {instance_profile_arn} to be usable by EC2", polling))


def instance_profile_not_visible(error: BaseException) -> bool:
    """EC2 does not see a just-created instance profile yet (it will within seconds)."""
    return is_aws_error(error, "InvalidParameterValue") and "iaminstanceprofile" in aws_message(error).lower()


def wait_for_state(region: str, instance_id: str, states: Iterable[str], polling: Polling = STATE_POLLING) -> Instance:
    wanted = set(states)

    def check() -> Instance | None:
        instance = describe_instance(region, instance_id)
        if instance is None:
            raise Ec2Error(f"instance {instance_id} disappeared while km waited for it to be {' or '.join(sorted(wanted))}")
        return instance if instance.state in wanted else None

    return wait_for(check, f"instance {instance_id} to be {' or '.join(sorted(wanted))}", polling)


def hibernation_unavailable(error: BaseException) -> bool:
    return is_aws_error(error, *HIBERNATION_UNAVAILABLE_CODES)


def stop_instance(region: str, instance_id: str, hibernate: bool) -> StopOutcome:
    """Stop the instance, hibernating when asked and possible; says which happened."""
    ec2 = client("ec2", region)
    if hibernate:
        try:
            ec2.stop_instances(InstanceIds=[instance_id], Hibernate=True)
            return "hibernated"
        except Exception as error:
            if not hibernation_unavailable(error):
                if is_aws_error(error):
                    raise as_ec2_error(error, f"hibernating {instance_id}") from None
                raise
    try:
        ec2.stop_instances(InstanceIds=[instance_id])
    except Exception as error:
        if is_aws_error(error):
            raise as_ec2_error(
                error, f"stopping {instance_id}", "a one-time spot instance cannot be stopped; destroy it"
            ) from None
        raise
    return "stopped"


def start_instance(region: str, instance_id: str) -> None:
    """Start a stopped (or hibernated) instance; `CapacityError` when its zone has no room for it now."""
    try:
        client("ec2", region).start_instances(InstanceIds=[instance_id])
    except Exception as error:
        if is_aws_error(error):
            raise as_ec2_error(error, f"starting {instance_id}") from None
        raise


def terminate_and_wait(region: str, instance_ids: Iterable[str], polling: Polling = TERMINATE_POLLING) -> list[str]:
    """Terminate the instances and wait until EC2 reports each terminated (or forgotten); returns those asked."""
    ids = sorted(set(instance_ids))
    if not ids:
        return []
    ec2 = client("ec2", region)
    try:
        ec2.terminate_instances(InstanceIds=ids)
    except Exception as error:
        if not is_aws_error(error, "InvalidInstanceID.NotFound"):
            raise
        for instance_id in ids:  # one of them is gone already: the others one by one
            try:
                ec2.terminate_instances(InstanceIds=[instance_id])
            except Exception as each:
                if not is_aws_error(each, "InvalidInstanceID.NotFound"):
                    raise

    def all_terminated() -> bool | None:
        # A filter, not InstanceIds: an id EC2 has already forgotten is then simply absent, not an error.
        reservations = ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": ids}])["Reservations"]
        states = [item["State"]["Name"] for reservation in reservations for item in reservation["Instances"]]
        return True if all(state == "terminated" for state in states) else None

    wait_for(all_terminated, f"{', '.join(ids)} to terminate", polling)
    return ids
