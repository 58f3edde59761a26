"""The plan's image slug (`amazon-linux-2023`, `debian-12`, `ubuntu-24.04`, …) as an AMI id in a region.

Each family's publisher keeps an SSM public parameter pointing at its newest image; that is one cheap
call. When the parameter is missing (a new region, a partition without it, a caller without
ssm:GetParameter), the publisher's images are searched by owner and name instead, newest first. An
`ami-…` id is used as written, after checking it exists and suits the instance's architecture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, is_aws_error

Architecture = Literal["x86_64", "arm64"]
_AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")
_INSTANCE_TYPE = re.compile(r"([a-z]+)(\d+)([a-z-]*)\.[a-z0-9]+")
# Graviton families with no `g` after the generation digit.
_ARM_FAMILIES = frozenset({"a1"})


@dataclass(frozen=True)
class ImageFamily:
    """Where one publisher's images are: an SSM public parameter, and an owner and name to search."""

    ssm_parameter: str  # `{arch}` is replaced by the family's spelling of the architecture
    owner: str
    name_pattern: str
    arch_names: Mapping[Architecture, str]


_DEBIAN_ARCH: Mapping[Architecture, str] = {"x86_64": "amd64", "arm64": "arm64"}

IMAGE_FAMILIES: Mapping[str, ImageFamily] = {
    "amazon-linux-2023": ImageFamily(
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}",
        "amazon",
        "al2023-ami-2023.*-kernel-*-{arch}",
        {"x86_64": "x86_64", "arm64": "arm64"},
    ),
    "debian-12": ImageFamily("/aws/service/debian/release/12/latest/{arch}", "136693071363", "debian-12-{arch}-*", _DEBIAN_ARCH),
    "ubuntu-24.04": ImageFamily(
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/{arch}/hvm/ebs-gp3/ami-id",
        "099720109477",
        "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*",
        _DEBIAN_ARCH,
    ),
    "ubuntu-22.04": ImageFamily(
        "/aws/service/canonical/ubuntu/server/22.04/stable/current/{arch}/hvm/ebs-gp2/ami-id",
        "099720109477",
        "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-{arch}-server-*",
        _DEBIAN_ARCH,
    ),
}


@dataclass(frozen=True)
class Image:
    image_id: str
    architecture: Architecture
    source: str  # how it was found: `literal`, `ssm:<parameter>` or `describe-images:<owner>/<name>`
    root_device: str | None = None  # known when the image itself was described


def architecture_for(instance_type: str) -> Architecture:
    """arm64 for Graviton types (a `g` among the letters after the generation: t4g, m7gd, c7gn, g5g; and a1)."""
    match = _INSTANCE_TYPE.fullmatch(instance_type)
    if match is None:  # high-memory `u-…` and the like: all x86
        return "x86_64"
    family, generation, attributes = match.groups()
    if f"{family}{generation}" in _ARM_FAMILIES or "g" in attributes:
        return "arm64"
    return "x86_64"


def resolve_ami(region: str, ami: str, instance_type: str, families: Mapping[str, ImageFamily] = IMAGE_FAMILIES) -> Image:
    """The image to launch for the plan's `ami` on `instance_type`; `Ec2Error` saying what to set when none fits."""
    architecture = architecture_for(instance_type)
    if _AMI_ID.fullmatch(ami):
        return _literal(region, ami, architecture, instance_type)
    family = families.get(ami)
    if family is None:
        raise Ec2Error(f"spec.runtime.ami {ami!r} is not an image km knows; use one of {', '.join(families)} or an ami-… id")
    arch_name = family.arch_names[architecture]
    parameter = family.ssm_parameter.format(arch=arch_name)
    try:
        value = client("ssm", region).get_parameter(Name=parameter)["Parameter"]["Value"]
        return Image(str(value), architecture, f"ssm:{parameter}")
    except Exception as error:
        if not is_aws_error(error, "ParameterNotFound", "AccessDeniedException"):
            raise
    pattern = family.name_pattern.format(arch=arch_name)
    found = _describe(
        region,
        f"searching {ami} images",
        Owners=[family.owner],
        Filters=[
            {"Name": "name", "Values": [pattern]},
            {"Name": "architecture", "Values": [architecture]},
            {"Name": "state", "Values": ["available"]},
        ],
    )
    if not found:
        raise Ec2Error(
            f"no {ami} image for {architecture} in {region} (no SSM parameter {parameter}, no image of owner {family.owner} "
            f"named {pattern}); set spec.runtime.ami to an ami-… id available there"
        )
    newest = max(found, key=lambda image: (image.get("CreationDate", ""), image.get("Name", "")))
    return Image(str(newest["ImageId"]), architecture, f"describe-images:{family.owner}/{pattern}", newest.get("RootDeviceName"))


def _literal(region: str, image_id: str, architecture: Architecture, instance_type: str) -> Image:
    found = _describe(region, f"describing {image_id}", ImageIds=[image_id], missing_ok=True)
    if not found:
        raise Ec2Error(
            f"spec.runtime.ami {image_id} does not exist in {region} (or is not shared with this account); "
            f"use an image from {region}"
        )
    image = found[0]
    if image.get("Architecture") != architecture:
        raise Ec2Error(
            f"spec.runtime.ami {image_id} is a {image.get('Architecture')} image but {instance_type} runs {architecture}; "
            f"pick a matching image or instance type"
        )
    return Image(image_id, architecture, "literal", image.get("RootDeviceName"))


def _describe(region: str, what: str, missing_ok: bool = False, **query: Any) -> list[dict[str, Any]]:
    try:
        return list(client("ec2", region).describe_images(**query)["Images"])
    except Exception as error:
        if missing_ok and is_aws_error(error, "InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"):
            return []
        if is_aws_error(error):
            raise as_ec2_error(error, what) from None
        raise
