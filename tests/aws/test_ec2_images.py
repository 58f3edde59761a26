"""Image slugs as AMI ids: the publisher's SSM public parameter first, a newest-first owner and name search when
there is none, the instance type's architecture throughout, literal ids checked, and an error that says what to set."""

from __future__ import annotations

import pytest

from controller.substrates.ec2 import Ec2Error, architecture_for, resolve_ami
from controller.substrates.ec2.images import IMAGE_FAMILIES, ImageFamily
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import aws_calls

AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
ACCOUNT = "123456789012"  # moto's
# A family published by this account, with no SSM parameter: only the DescribeImages search can find it.
OWN_FAMILY = ImageFamily(
    "/km-test/no-such-parameter/{arch}", ACCOUNT, "km-test-image-{arch}-*", {"x86_64": "amd64", "arm64": "arm64"}
)


@pytest.mark.parametrize(
    ("instance_type", "architecture"),
    [
        ("t3.medium", "x86_64"),
        ("t4g.small", "arm64"),
        ("m7g.large", "arm64"),
        ("c7gn.xlarge", "arm64"),
        ("m6gd.large", "arm64"),
        ("r8g.medium", "arm64"),
        ("g5g.xlarge", "arm64"),
        ("im4gn.large", "arm64"),
        ("is4gen.medium", "arm64"),
        ("a1.large", "arm64"),
        ("g4dn.xlarge", "x86_64"),  # GPU, not Graviton
        ("g5.xlarge", "x86_64"),
        ("c7i.large", "x86_64"),
        ("m7a.large", "x86_64"),
        ("inf2.xlarge", "x86_64"),
        ("u-6tb1.metal", "x86_64"),
    ],
)
def test_graviton_types_are_arm64(instance_type: str, architecture: str) -> None:
    assert architecture_for(instance_type) == architecture


@pytest.mark.parametrize(("instance_type", "arch"), [("t3.medium", "x86_64"), ("t4g.small", "arm64")])
def test_amazon_linux_comes_from_its_public_parameter(moto: Moto, instance_type: str, arch: str) -> None:
    parameter = AL2023.format(arch=arch)
    published = moto.client("ssm").get_parameter(Name=parameter)["Parameter"]["Value"]

    with aws_calls() as calls:
        image = resolve_ami(REGION, "amazon-linux-2023", instance_type)

    assert (image.image_id, image.architecture, image.source) == (published, arch, f"ssm:{parameter}")
    assert dict(calls) == {"ssm.GetParameter": 1}
    described = moto.client("ec2").describe_images(ImageIds=[published])["Images"][0]
    assert described["Architecture"] == arch and described["Name"].startswith("al2023-ami-2023.")


def copy_as(moto: Moto, arch: str, name: str) -> str:
    """An image of this account named `name`, copied from moto's Amazon Linux for `arch`."""
    source = moto.client("ssm").get_parameter(Name=AL2023.format(arch=arch))["Parameter"]["Value"]
    return str(moto.client("ec2").copy_image(SourceImageId=source, SourceRegion=REGION, Name=name)["ImageId"])


def test_without_a_parameter_the_newest_image_of_the_owner_and_architecture_is_found(moto: Moto) -> None:
    copy_as(moto, "x86_64", "km-test-image-amd64-20250101")
    newest = copy_as(moto, "x86_64", "km-test-image-amd64-20260101")
    arm = copy_as(moto, "arm64", "km-test-image-arm64-20260101")
    copy_as(moto, "x86_64", "other-image-amd64-20270101")  # another name: not the family
    families = {"km-test": OWN_FAMILY}

    with aws_calls() as calls:
        image = resolve_ami(REGION, "km-test", "t3.medium", families)

    assert (image.image_id, image.architecture) == (newest, "x86_64")
    assert image.source == f"describe-images:{ACCOUNT}/km-test-image-amd64-*"
    assert dict(calls) == {"ssm.GetParameter": 1, "ec2.DescribeImages": 1}  # the parameter was asked first
    assert resolve_ami(REGION, "km-test", "c7g.large", families).image_id == arm


def test_no_image_says_what_to_set(moto: Moto) -> None:
    # moto publishes neither Debian's parameter nor Debian's images: both real lookups come back empty.
    with pytest.raises(Ec2Error) as raised:
        resolve_ami(REGION, "debian-12", "t4g.small")

    message = str(raised.value)
    assert "no debian-12 image for arm64 in us-east-1" in message
    assert "/aws/service/debian/release/12/latest/arm64" in message and "136693071363" in message
    assert message.endswith("set spec.runtime.ami to an ami-… id available there")


def test_every_slug_the_schema_accepts_has_a_family() -> None:
    from controller.profile.field_types import AMI_SLUGS

    assert sorted(IMAGE_FAMILIES) == sorted(AMI_SLUGS)
    ubuntu = IMAGE_FAMILIES["ubuntu-24.04"]
    assert (
        ubuntu.ssm_parameter.format(arch="amd64")
        == "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    )


def test_a_literal_id_is_checked_not_looked_up(moto: Moto) -> None:
    x86 = moto.client("ssm").get_parameter(Name=AL2023.format(arch="x86_64"))["Parameter"]["Value"]

    with aws_calls() as calls:
        image = resolve_ami(REGION, x86, "t3.medium")

    assert (image.image_id, image.source, image.root_device) == (x86, "literal", "/dev/xvda")
    assert dict(calls) == {"ec2.DescribeImages": 1}
    with pytest.raises(Ec2Error, match=f"{x86} is a x86_64 image but t4g.small runs arm64"):
        resolve_ami(REGION, x86, "t4g.small")
    with pytest.raises(Ec2Error, match="ami-0123456789abcdef0 does not exist in us-east-1"):
        resolve_ami(REGION, "ami-0123456789abcdef0", "t3.medium")


def test_an_unknown_slug_lists_the_known_ones() -> None:
    with pytest.raises(Ec2Error, match="'gentoo' is not an image km knows; use one of amazon-linux-2023, debian-12"):
        resolve_ami(REGION, "gentoo", "t3.medium")
