"""Block devices and mount points of a sandbox.

The additional volume's device defaults to `/dev/sdf`. When the image's block device mappings already
claim it, the next free `/dev/sd[f-p]` is taken, and that same device is what the boot script mounts
(the original tool rotated the device but still mounted `/dev/sdf`). The image's mappings are an input,
so this is decided without AWS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from controller.profile import Finding, ProfileError, SandboxProfile

VolumeKind = Literal["root", "ebs", "efs"]
CANDIDATE_LETTERS = "fghijklmnop"
# Where each image family's root device is mapped (EC2 conventions for the public images).
ROOT_DEVICE_BY_AMI = {
    "amazon-linux-2023": "/dev/xvda",
    "debian-12": "/dev/xvda",
    "ubuntu-24.04": "/dev/sda1",
    "ubuntu-22.04": "/dev/sda1",
}
_DEVICE = re.compile(r"/dev/(?:sd|xvd)([a-z])\d*")


@dataclass(frozen=True)
class Volume:
    device: str | None
    mount_point: str
    size_gib: int | None
    kind: VolumeKind
    encrypted: bool = False

    def as_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "mountPoint": self.mount_point,
            "sizeGiB": self.size_gib,
            "kind": self.kind,
            "encrypted": self.encrypted,
        }


def claimed_letters(device_names: Iterable[str]) -> set[str]:
    """Drive letters an image already maps; `/dev/xvdf` and `/dev/sdf` name the same slot."""
    letters = set()
    for name in device_names:
        match = _DEVICE.fullmatch(name.strip())
        if match:
            letters.add(match.group(1))
    return letters


def choose_additional_device(ami_block_device_names: Iterable[str]) -> str:
    taken = claimed_letters(ami_block_device_names)
    for letter in CANDIDATE_LETTERS:
        if letter not in taken:
            return f"/dev/sd{letter}"
    raise ProfileError(
        [
            Finding(
                ("spec", "runtime", "additionalVolume"),
                "the image maps every device from /dev/sdf to /dev/sdp; use an image with fewer block device mappings",
            )
        ]
    )


def plan_volumes(profile: SandboxProfile, ami: str, ami_block_device_names: Iterable[str] = ()) -> list[Volume]:
    runtime = profile.spec.runtime
    volumes = [
        Volume(ROOT_DEVICE_BY_AMI.get(ami, "/dev/xvda"), "/", runtime.root_volume_size or None, "root", runtime.hibernation)
    ]
    if runtime.additional_volume is not None:
        extra = runtime.additional_volume
        device = choose_additional_device(ami_block_device_names)
        volumes.append(Volume(device, extra.mount_point, extra.size, "ebs", extra.encrypted))
    if runtime.mount_efs:
        volumes.append(Volume(None, runtime.efs_mount_point, None, "efs"))
    return volumes
