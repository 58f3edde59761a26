"""The sandbox's instance from goose's plan: type, image, IMDSv2, an encrypted gp3 root of the planned size,
hibernation or spot as planned, tags, user data (verbatim when small; a stub and an S3 object when not), the data
volume at the compiler's device; and stop, start, terminate, describe, with capacity refusals as `CapacityError`."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from controller.compiler import CompiledPlan, render_iam_policy
from controller.substrates.ec2 import (
    CapacityError,
    Ec2Error,
    as_capacity_error,
    describe_instance,
    ec2_plan,
    ensure_data_volume,
    ensure_instance,
    ensure_instance_profile,
    ensure_role,
    ensure_security_group,
    find_subnets,
    find_vpc,
    resolve_ami,
    start_instance,
    stop_instance,
    terminate_and_wait,
)
from controller.substrates.ec2.instances import hibernation_unavailable, instance_profile_not_visible, launch_request
from controller.substrates.ec2.userdata import STUB_SCRIPT_PATH, USERDATA_LIMIT_BYTES, encoded_size, userdata_key
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import (
    BUCKET,
    FAST,
    PREFIX,
    SANDBOX_ID,
    aws_calls,
    compiled,
    compiled_variant,
    make_bucket,
    only_instance,
    operator_config,
    sandbox_tags,
    writes,
)


def launch(plan: CompiledPlan, userdata: str | None = None, bucket: str | None = BUCKET) -> dict[str, Any]:
    """Everything an instance needs, made with the other steps, then the instance; returns the pieces."""
    tags, shape = sandbox_tags(plan), ec2_plan(plan.plan)
    vpc = find_vpc(REGION, operator_config())
    ensure_role(REGION, tags, render_iam_policy(plan.iam_policy, SANDBOX_ID, BUCKET), shape.role_session_seconds)
    profile_arn = ensure_instance_profile(REGION, tags, tags.name)
    group_id = ensure_security_group(REGION, tags, vpc, shape.egress)
    image = resolve_ami(REGION, shape.ami, shape.instance_type)
    subnet = find_subnets(REGION, vpc, operator_config())[0]
    arguments = (
        REGION,
        tags,
        shape,
        image,
        subnet.subnet_id,
        group_id,
        profile_arn,
        plan.userdata if userdata is None else userdata,
    )
    instance = ensure_instance(*arguments, bucket, FAST)
    return {
        "instance": instance,
        "image": image,
        "subnet": subnet,
        "group_id": group_id,
        "profile_arn": profile_arn,
        "arguments": arguments,
    }


def user_data(moto: Moto, instance_id: str) -> str:
    encoded = moto.client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(encoded).decode("utf-8")


def aws_error(code: str, message: str = "words from AWS", operation: str = "RunInstances") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_goose_instance_is_what_the_plan_says(moto: Moto) -> None:
    goose = compiled()
    made = launch(goose)

    described = only_instance(moto)
    assert described["InstanceId"] == made["instance"].instance_id
    assert described["InstanceType"] == "t3.medium"
    assert described["ImageId"] == made["image"].image_id
    assert described["SubnetId"] == made["subnet"].subnet_id
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [made["group_id"]]
    assert described["IamInstanceProfile"]["Arn"] == made["profile_arn"]
    assert described["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    assert described["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert described["HibernationOptions"] == {"Configured": True}  # goose: hibernation: true
    assert "InstanceLifecycle" not in described  # goose: spot: false
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        "km:sandbox-id": SANDBOX_ID,
        "km:profile": "goose",
        "km:plan-hash": goose.hash,
        "km:resource-prefix": PREFIX,
        "Name": f"{PREFIX}-{SANDBOX_ID}",
    }
    assert made["instance"].plan_hash == goose.hash
    root_mapping = described["BlockDeviceMappings"][0]
    assert (root_mapping["DeviceName"], root_mapping["Ebs"]["DeleteOnTermination"]) == ("/dev/xvda", True)
    root = moto.client("ec2").describe_volumes(VolumeIds=[root_mapping["Ebs"]["VolumeId"]])["Volumes"][0]
    assert (root["Size"], root["VolumeType"], root["Encrypted"]) == (15, "gp3", True)
    assert {t["Key"]: t["Value"] for t in root["Tags"]}["Name"] == f"{PREFIX}-{SANDBOX_ID}-root"
    assert user_data(moto, described["InstanceId"]) == goose.userdata  # small enough: verbatim


def test_a_second_ensure_finds_the_instance(moto: Moto) -> None:
    made = launch(compiled())

    with aws_calls() as calls:
        again = ensure_instance(*made["arguments"], BUCKET, FAST)

    assert again.instance_id == made["instance"].instance_id
    assert dict(calls) == {"ec2.DescribeInstances": 1}
    only_instance(moto)


def test_the_data_volume_is_made_in_the_instances_zone_and_attached_at_the_device(moto: Moto) -> None:
    goose = compiled()
    instance = launch(goose)["instance"]
    planned = ec2_plan(goose.plan).data_volumes
    assert [(v.device, v.size_gib, v.encrypted) for v in planned] == [("/dev/sdf", 20, False)]

    volume_id = ensure_data_volume(REGION, sandbox_tags(goose), instance, planned[0], FAST)

    volume = moto.client("ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (20, "gp3", False)
    assert volume["AvailabilityZone"] == instance.availability_zone
    assert [(a["InstanceId"], a["Device"]) for a in volume["Attachments"]] == [(instance.instance_id, "/dev/sdf")]
    tags = {t["Key"]: t["Value"] for t in volume["Tags"]}
    assert tags["km:device"] == "/dev/sdf" and tags["km:sandbox-id"] == SANDBOX_ID and tags["Name"] == f"km-{SANDBOX_ID}-data"
    with aws_calls() as calls:  # a second time: found, nothing made or attached
        assert ensure_data_volume(REGION, sandbox_tags(goose), instance, planned[0], FAST) == volume_id
    assert writes(calls) == {}
    described = describe_instance(REGION, instance.instance_id)
    assert described is not None and described.devices["/dev/sdf"] == volume_id


def test_a_data_volume_in_another_zone_is_not_attached(moto: Moto) -> None:
    goose = compiled()
    instance = launch(goose)["instance"]
    elsewhere = "us-east-1b" if instance.availability_zone != "us-east-1b" else "us-east-1c"
    tags = sandbox_tags(goose)
    moto.client("ec2").create_volume(
        AvailabilityZone=elsewhere,
        Size=20,
        VolumeType="gp3",
        TagSpecifications=tags.tag_specifications("volume", extra={"km:device": "/dev/sdf"}),
    )

    with pytest.raises(Ec2Error, match=f"is in {elsewhere}, the instance in {instance.availability_zone}"):
        ensure_data_volume(REGION, tags, instance, ec2_plan(goose.plan).data_volumes[0], FAST)


def test_a_spot_profile_launches_spot_without_hibernation(moto: Moto) -> None:
    open_dev = compiled("open-dev")
    shape = ec2_plan(open_dev.plan)
    assert (shape.spot, shape.hibernation) == (True, False)

    made = launch(open_dev)

    described = only_instance(moto)
    assert described["InstanceLifecycle"] == "spot"
    assert not described.get("HibernationOptions", {}).get("Configured")
    request = launch_request(sandbox_tags(open_dev), shape, made["image"], "subnet-1", "sg-1", "arn:profile", "#!/bin/bash\n")
    assert request["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
    }
    assert "HibernationOptions" not in request
    assert [spec["ResourceType"] for spec in request["TagSpecifications"]] == ["instance", "volume", "spot-instances-request"]


def big_goose(tmp_path: Path) -> CompiledPlan:
    """goose with a configFile large enough to push the boot script past EC2's limit."""
    notes = "".join(f"line {n}: {hashlib.sha256(str(n).encode()).hexdigest()}\n" for n in range(300))
    return compiled_variant(tmp_path, lambda spec: spec["execution"]["configFiles"].update({"/home/sandbox/notes.txt": notes}))


def test_large_user_data_goes_to_s3_and_the_instance_boots_a_stub(moto: Moto, tmp_path: Path) -> None:
    make_bucket(moto)
    plan = big_goose(tmp_path)
    assert encoded_size(plan.userdata) > USERDATA_LIMIT_BYTES

    instance = launch(plan)["instance"]

    stub = user_data(moto, instance.instance_id)
    stored = moto.client("s3").get_object(Bucket=BUCKET, Key=userdata_key(SANDBOX_ID))["Body"].read()
    assert userdata_key(SANDBOX_ID) == f"artifacts/{SANDBOX_ID}/km-userdata.sh"
    assert stored == plan.userdata.encode()
    assert stub.startswith("#!/bin/bash\n") and "\nset -euo pipefail\n" in stub and len(stub) < 3000
    assert hashlib.sha256(stored).hexdigest() in stub
    url = re.search(r'urlopen\("([^"]+)"', stub)
    assert url is not None and "X-Amz-Signature=" in url.group(1)  # SigV4: buckets made since 2020 refuse SigV2
    assert urllib.request.urlopen(url.group(1), timeout=10).read() == stored


def test_the_stub_fetches_checks_and_runs_the_script(moto: Moto, tmp_path: Path) -> None:
    make_bucket(moto)
    marker = tmp_path / "ran"
    script = f'#!/bin/bash\nset -eu\necho "fetched and ran as $0" > {marker}\n' + "# padding\n" * 2000
    instance = launch(compiled(), userdata=script)["instance"]
    stub = user_data(moto, instance.instance_id).replace(STUB_SCRIPT_PATH, str(tmp_path / "lib/userdata.sh"))

    subprocess.run(["bash", "-c", stub], check=True, timeout=60, env={"PATH": os.environ["PATH"]})

    assert marker.read_text() == f"fetched and ran as {tmp_path / 'lib/userdata.sh'}\n"
    assert (tmp_path / "lib/userdata.sh").stat().st_mode & 0o777 == 0o700


def test_large_user_data_without_a_bucket_is_refused(moto: Moto, tmp_path: Path) -> None:
    with pytest.raises(Ec2Error, match="exceeds EC2's 16 KB user data limit and no artifacts bucket was given"):
        launch(big_goose(tmp_path), bucket=None)


def test_a_missing_bucket_says_to_run_km_init(moto: Moto, tmp_path: Path) -> None:
    with pytest.raises(Ec2Error, match=f"uploading the boot script to s3://{BUCKET}/.*NoSuchBucket.*; run km init"):
        launch(big_goose(tmp_path))


def test_an_aws_refusal_names_what_was_being_done(moto: Moto) -> None:
    made = launch(compiled())
    terminate_and_wait(REGION, [made["instance"].instance_id], FAST)
    region, tags, shape, image, _, group_id, profile_arn, userdata = made["arguments"]

    with pytest.raises(Ec2Error, match="launching t3.medium for gebpfgk-1a2b3c4d: InvalidSubnetID.NotFound: ") as raised:
        ensure_instance(region, tags, shape, image, "subnet-0123456789abcdef0", group_id, profile_arn, userdata, BUCKET, FAST)
    assert not isinstance(raised.value, CapacityError)


def test_stop_start_terminate_and_describe(moto: Moto) -> None:
    instance_id = launch(compiled())["instance"].instance_id

    assert stop_instance(REGION, instance_id, hibernate=True) == "hibernated"
    assert moto.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"
    ] in (
        "stopping",
        "stopped",
    )
    start_instance(REGION, instance_id)
    described = describe_instance(REGION, instance_id)
    assert described is not None and described.state in ("pending", "running") and described.hibernation
    assert stop_instance(REGION, instance_id, hibernate=False) == "stopped"

    assert terminate_and_wait(REGION, [instance_id], FAST) == [instance_id]

    described = describe_instance(REGION, instance_id)
    assert described is not None and described.state == "terminated"
    assert terminate_and_wait(REGION, [instance_id], FAST) == [instance_id]  # again: harmless
    assert describe_instance(REGION, "i-0123456789abcdef0") is None


@pytest.mark.parametrize(
    "code",
    [
        "InsufficientInstanceCapacity",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    ],
)
def test_capacity_and_limit_refusals_are_capacity_errors(code: str) -> None:
    message = "We currently do not have sufficient t3.medium capacity in the Availability Zone you requested (us-east-1a)."

    error = as_capacity_error(aws_error(code, message), "launching t3.medium for sb-1")

    assert isinstance(error, CapacityError) and isinstance(error, Ec2Error)
    assert (error.code, error.aws_message) == (code, message)
    assert str(error) == f"launching t3.medium for sb-1: {code}: {message}"


@pytest.mark.parametrize("code", ["InvalidParameterValue", "UnauthorizedOperation", "InvalidAMIID.NotFound"])
def test_other_refusals_are_not_capacity_errors(code: str) -> None:
    assert as_capacity_error(aws_error(code), "launching") is None
    assert as_capacity_error(RuntimeError("not from AWS"), "launching") is None


def test_which_errors_fall_back_or_wait() -> None:
    not_configured = aws_error(
        "UnsupportedHibernationConfiguration", "The instance is not configured for hibernation", "StopInstances"
    )
    assert hibernation_unavailable(not_configured)
    assert not hibernation_unavailable(aws_error("IncorrectInstanceState", operation="StopInstances"))
    propagating = aws_error(
        "InvalidParameterValue", "Value (arn:aws:iam::1:instance-profile/km-x) for parameter iamInstanceProfile.arn is invalid."
    )
    assert instance_profile_not_visible(propagating)
    assert not instance_profile_not_visible(aws_error("InvalidParameterValue", "Invalid value for instanceType"))
