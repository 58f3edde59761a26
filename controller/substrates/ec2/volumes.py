"""The sandbox's additional EBS volumes: made in the instance's zone, tagged, attached at the compiler's device.

Each carries `km:device`, so a re-run finds the volume for a device whether the last run stopped before
or after attaching it. Volumes are not deleted with the instance (DeleteOnTermination is off for
attached volumes); teardown deletes them.
"""

from __future__ import annotations

import uuid
from typing import Any

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, is_aws_error
from controller.substrates.ec2.instances import Instance, wait_for_state
from controller.substrates.ec2.polling import Polling, wait_for
from controller.substrates.ec2.shape import DataVolume
from controller.substrates.ec2.tags import SandboxRef, SandboxTags, find_by_tag

DEVICE_TAG = "km:device"
VOLUME_POLLING = Polling(interval_seconds=2.0, timeout_seconds=180.0)
_GONE = ("deleting", "deleted", "error")


def find_data_volume(region: str, ref: SandboxRef, device: str) -> dict[str, Any] | None:
    """The sandbox's volume for `device` (one DescribeVolumes call), preferring one that is attached."""
    found = find_by_tag(client("ec2", region), "volumes", ref, {"Name": f"tag:{DEVICE_TAG}", "Values": [device]})
    usable = [volume for volume in found if volume["State"] not in _GONE]
    usable.sort(key=lambda volume: (not volume.get("Attachments"), volume["VolumeId"]))
    return usable[0] if usable else None


def ensure_data_volume(
    region: str, tags: SandboxTags, instance: Instance, volume: DataVolume, polling: Polling = VOLUME_POLLING
) -> str:
    """The volume for `volume.device`, attached to `instance` there; returns its id.

    Nothing is read when the instance already shows a volume at that device.
    """
    if volume.device in instance.devices:
        return instance.devices[volume.device]
    ec2 = client("ec2", region)
    what = f"the {volume.mount_point} volume of {tags.sandbox_id}"
    try:
        found = find_data_volume(region, tags, volume.device)
        if found is None:
            volume_id, state = _create(ec2, tags, instance, volume)
        else:
            volume_id, state = str(found["VolumeId"]), str(found["State"])
            attachments = found.get("Attachments", [])
            if any(a["InstanceId"] == instance.instance_id and a["Device"] == volume.device for a in attachments):
                return volume_id
            if attachments:
                raise Ec2Error(
                    f"{what} ({volume_id}) is attached to {attachments[0]['InstanceId']}; detach it or destroy the sandbox"
                )
            if found["AvailabilityZone"] != instance.availability_zone:
                raise Ec2Error(
                    f"{what} ({volume_id}) is in {found['AvailabilityZone']}, "
                    f"the instance in {instance.availability_zone}; destroy the sandbox and create it again"
                )
        if state != "available":
            _wait_available(region, volume_id, polling)
        if instance.state not in ("running", "stopped"):  # EC2 attaches only to a running or stopped instance
            wait_for_state(region, instance.instance_id, ("running", "stopped"), polling)
        ec2.attach_volume(Device=volume.device, InstanceId=instance.instance_id, VolumeId=volume_id)
    except Exception as error:
        if not is_aws_error(error):
            raise
        raise as_ec2_error(error, f"attaching {what}") from None
    return volume_id


def delete_volumes(region: str, ref: SandboxRef, polling: Polling = VOLUME_POLLING) -> list[str]:
    """Delete every volume still tagged for the sandbox (detaching any still attached); returns their ids."""
    ec2 = client("ec2", region)
    deleted = []
    for found in find_by_tag(ec2, "volumes", ref):
        volume_id = str(found["VolumeId"])
        if found["State"] in _GONE:
            continue
        if found["State"] == "in-use":
            _detach(ec2, volume_id)
        if _delete_when_free(ec2, volume_id, polling):
            deleted.append(volume_id)
    return deleted


def _create(ec2: Any, tags: SandboxTags, instance: Instance, volume: DataVolume) -> tuple[str, str]:
    created = ec2.create_volume(
        AvailabilityZone=instance.availability_zone,
        Size=volume.size_gib,
        VolumeType="gp3",
        Encrypted=volume.encrypted,
        TagSpecifications=tags.tag_specifications("volume", name=f"{tags.name}-data", extra={DEVICE_TAG: volume.device}),
        ClientToken=f"{tags.sandbox_id}-{uuid.uuid4().hex}"[:64],
    )
    return str(created["VolumeId"]), str(created["State"])


def _wait_available(region: str, volume_id: str, polling: Polling) -> None:
    ec2 = client("ec2", region)

    def check() -> bool | None:
        state = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"]
        if state == "available":
            return True
        if state in _GONE:
            raise Ec2Error(f"volume {volume_id} is {state}; run the create again")
        return None

    wait_for(check, f"volume {volume_id} to be available", polling)


def _delete_when_free(ec2: Any, volume_id: str, polling: Polling) -> bool:
    def attempt() -> bool | None:
        try:
            ec2.delete_volume(VolumeId=volume_id)
        except Exception as error:
            if is_aws_error(error, "InvalidVolume.NotFound"):
                return False
            if is_aws_error(error, "VolumeInUse", "IncorrectState"):
                return None
            raise
        return True

    return wait_for(attempt, f"volume {volume_id} to be detached", polling)


def _detach(ec2: Any, volume_id: str) -> None:
    try:
        ec2.detach_volume(VolumeId=volume_id, Force=True)
    except Exception as error:
        if not is_aws_error(error, "InvalidVolume.NotFound", "IncorrectState", "InvalidAttachment.NotFound"):
            raise
