"""What the EC2 substrate reads from a compiled plan, in one typed place.

The plan is the compiler's output (plan.json); its machine shape is spread over `sandbox`, `volumes`,
`securityGroup` and the resolved profile. Reading it here once keeps every step's inputs explicit and
makes a plan that lacks something EC2 needs fail before any resource is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.profile.durations import DurationError, parse_duration
from controller.substrates.ec2.errors import Ec2Error

DEFAULT_ROLE_SESSION_SECONDS = 3600
# IAM's bounds for a role's MaxSessionDuration.
ROLE_SESSION_RANGE = (3600, 43200)


@dataclass(frozen=True)
class DataVolume:
    """An additional EBS volume: made in the instance's zone and attached at the compiler's device."""

    device: str
    size_gib: int
    encrypted: bool
    mount_point: str


@dataclass(frozen=True)
class Ec2Plan:
    instance_type: str
    ami: str  # a slug such as amazon-linux-2023, or a literal ami-… id
    root_device: str
    root_size_gib: int | None  # None keeps the image's size
    spot: bool
    hibernation: bool
    data_volumes: tuple[DataVolume, ...]
    egress: tuple[Mapping[str, Any], ...]  # the compiler's security group rules, destinations still symbolic
    role_session_seconds: int
    mounts_efs: bool


def ec2_plan(plan: Mapping[str, Any]) -> Ec2Plan:
    """The EC2 parts of a compiled plan; `Ec2Error` naming the field when one is missing or unusable."""
    try:
        sandbox = plan["sandbox"]
        runtime = plan["profile"]["spec"]["runtime"]
        volumes = plan["volumes"]
        egress = tuple(plan["securityGroup"]["egress"])
    except (KeyError, TypeError) as missing:
        raise Ec2Error(f"the compiled plan has no {missing}; recompile the profile with this version of km") from None
    if sandbox.get("substrate") != "ec2":
        raise Ec2Error(f"the plan is for the {sandbox.get('substrate')!r} substrate, not ec2; set spec.runtime.substrate: ec2")
    root = next((volume for volume in volumes if volume["kind"] == "root"), None)
    if root is None or not root.get("device"):
        raise Ec2Error("the compiled plan has no root volume device; recompile the profile with this version of km")
    data = []
    for volume in volumes:
        if volume["kind"] != "ebs":
            continue
        if not volume.get("device") or not volume.get("sizeGiB"):
            raise Ec2Error(f"the plan's volume at {volume.get('mountPoint')} has no device or size; recompile the profile")
        data.append(DataVolume(volume["device"], int(volume["sizeGiB"]), bool(volume["encrypted"]), volume["mountPoint"]))
    return Ec2Plan(
        instance_type=str(sandbox["instanceType"]),
        ami=str(sandbox["ami"]),
        root_device=str(root["device"]),
        root_size_gib=int(root["sizeGiB"]) if root.get("sizeGiB") else None,
        spot=bool(runtime.get("spot", False)),
        hibernation=bool(runtime.get("hibernation", False)),
        data_volumes=tuple(data),
        egress=egress,
        role_session_seconds=role_session_seconds(plan),
        mounts_efs=any(volume["kind"] == "efs" for volume in volumes),
    )


def role_session_seconds(plan: Mapping[str, Any]) -> int:
    """The role's MaxSessionDuration from `spec.identity.roleSessionDuration` (IAM allows 1h to 12h)."""
    identity = plan["profile"]["spec"].get("identity") or {}
    text = identity.get("roleSessionDuration")
    if text is None:
        return DEFAULT_ROLE_SESSION_SECONDS
    try:
        seconds = parse_duration(text)
    except DurationError as error:
        raise Ec2Error(f"spec.identity.roleSessionDuration: {error}") from None
    low, high = ROLE_SESSION_RANGE
    if not low <= seconds <= high:
        raise Ec2Error(f"spec.identity.roleSessionDuration: {text!r} is outside IAM's 1h to 12h; choose a value in that range")
    return seconds
