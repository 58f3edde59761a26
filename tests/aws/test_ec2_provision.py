"""A whole sandbox converged from goose's compiled plan: made once, found ever after (a no-op run reads five
times and writes nothing), finished correctly after a crash at any step, and removed completely."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controller.compiler import render_iam_policy
from controller.substrates.ec2 import (
    Ec2Error,
    SandboxResources,
    TeardownIncomplete,
    destroy_all,
    ec2_plan,
    ensure_data_volume,
    ensure_instance,
    ensure_instance_profile,
    ensure_role,
    ensure_sandbox,
    ensure_security_group,
    find_subnets,
    find_vpc,
    resolve_ami,
)
from controller.substrates.ec2.provision import sandbox_identity
from controller.substrates.ec2.userdata import sandbox_userdata
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import (
    BUCKET,
    EFS_ID,
    FAST,
    NOTHING_TAGGED,
    PREFIX,
    SANDBOX_ID,
    aws_calls,
    compiled,
    make_bucket,
    only_instance,
    operator_config,
    reads,
    sandbox_tags,
    tagged,
    writes,
)

STEPS = ["role", "instance profile", "security group", "instance", "data volume"]


def create_steps(done: int) -> dict[str, Any]:
    """The resource steps as a create runs them, stopped after `done` of them (a crash); what each made."""
    goose = compiled()
    tags, shape, config = sandbox_tags(goose), ec2_plan(goose.plan), operator_config()
    vpc = find_vpc(REGION, config)
    policy = render_iam_policy(goose.iam_policy, SANDBOX_ID, BUCKET)
    made: dict[str, Any] = {"role": ensure_role(REGION, tags, policy, shape.role_session_seconds)}
    if done >= 2:
        made["instance profile"] = ensure_instance_profile(REGION, tags, tags.name)
    if done >= 3:
        made["security group"] = ensure_security_group(REGION, tags, vpc, shape.egress)
    if done >= 4:
        image = resolve_ami(REGION, shape.ami, shape.instance_type)
        subnet = find_subnets(REGION, vpc, config)[0]
        userdata = sandbox_userdata(goose.userdata, sandbox_identity(tags, REGION, vpc, BUCKET, config))
        profile, group = made["instance profile"], made["security group"]
        made["instance"] = ensure_instance(REGION, tags, shape, image, subnet.subnet_id, group, profile, userdata, BUCKET, FAST)
    if done >= 5:
        made["data volume"] = ensure_data_volume(REGION, tags, made["instance"], shape.data_volumes[0], FAST)
    return made


def converge() -> SandboxResources:
    goose = compiled()
    return ensure_sandbox(
        REGION, sandbox_tags(goose), goose.plan, goose.userdata, artifacts_bucket=BUCKET, config=operator_config(), polling=FAST
    )


def test_goose_becomes_one_of_everything(moto: Moto) -> None:
    make_bucket(moto)
    made = converge()

    left = tagged(moto)
    assert {kind: len(ids) for kind, ids in left.items()} == {
        "instances": 1,
        "volumes": 2,  # root and /data
        "security_groups": 1,
        "roles": 1,
        "instance_profiles": 1,
    }
    instance = only_instance(moto)
    assert made.instance.instance_id == instance["InstanceId"] and made.launched
    assert instance["SecurityGroups"][0]["GroupId"] == made.security_group_id
    assert instance["IamInstanceProfile"]["Arn"] == made.instance_profile_arn
    assert {m["DeviceName"] for m in instance["BlockDeviceMappings"]} == {"/dev/xvda", "/dev/sdf"}
    vpc = find_vpc(REGION, operator_config())
    identity = {
        "KM_SANDBOX_ID": SANDBOX_ID,
        "KM_REGION": REGION,
        "KM_RESOURCE_PREFIX": PREFIX,
        "KM_ARTIFACTS_URI": f"s3://{BUCKET}",
        "KM_DNS_UPSTREAM": vpc.resolver,
        "KM_EFS_ID": EFS_ID,
    }
    encoded = moto.client("ec2").describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
    assert base64.b64decode(encoded["UserData"]["Value"]).decode() == sandbox_userdata(compiled().userdata, identity)


def test_a_second_run_reads_five_times_and_writes_nothing(moto: Moto) -> None:
    make_bucket(moto)
    first = converge()

    with aws_calls() as calls:
        second = converge()

    assert second.launched is False and first.launched is True
    assert (
        second.instance.instance_id,
        second.security_group_id,
        second.role_arn,
        second.instance_profile_arn,
        second.data_volume_ids,
    ) == (
        first.instance.instance_id,
        first.security_group_id,
        first.role_arn,
        first.instance_profile_arn,
        first.data_volume_ids,
    )
    assert writes(calls) == {}
    assert sum(reads(calls).values()) <= 5, reads(calls)
    assert sorted(reads(calls)) == [
        "ec2.DescribeInstances",
        "ec2.DescribeSecurityGroups",
        "ec2.DescribeVpcs",
        "iam.GetRole",
        "iam.GetRolePolicy",
    ]


@pytest.mark.parametrize("done", range(1, len(STEPS) + 1), ids=[f"crash-after-{step.replace(' ', '-')}" for step in STEPS])
def test_a_run_after_a_crash_finishes_with_one_of_everything(moto: Moto, done: int) -> None:
    make_bucket(moto)
    partial = create_steps(done)

    made = converge()

    left = tagged(moto)
    assert {kind: len(ids) for kind, ids in left.items()} == {
        "instances": 1,
        "volumes": 2,
        "security_groups": 1,
        "roles": 1,
        "instance_profiles": 1,
    }
    assert made.role_arn == partial["role"]
    assert made.launched == (done < 4)
    if done >= 3:
        assert made.security_group_id == partial["security group"]
    if done >= 5:
        assert made.data_volume_ids == (partial["data volume"],)
    attached = only_instance(moto)["BlockDeviceMappings"]
    assert [m["DeviceName"] for m in attached].count("/dev/sdf") == 1


def test_teardown_leaves_nothing_and_can_run_again(moto: Moto) -> None:
    make_bucket(moto)
    made = converge()

    removed = destroy_all(SANDBOX_ID, REGION, PREFIX, FAST)

    assert removed.instances == (made.instance.instance_id,)
    assert removed.volumes == made.data_volume_ids  # the root went with the instance
    assert removed.security_groups == (made.security_group_id,)
    assert removed.roles == removed.instance_profiles == (f"{PREFIX}-{SANDBOX_ID}",)
    assert tagged(moto) == NOTHING_TAGGED
    again = destroy_all(SANDBOX_ID, REGION, PREFIX, FAST)
    assert again.nothing


@pytest.mark.parametrize("done", range(1, len(STEPS)), ids=[f"after-{step.replace(' ', '-')}" for step in STEPS[:-1]])
def test_teardown_after_a_partial_create(moto: Moto, done: int) -> None:
    make_bucket(moto)
    create_steps(done)

    destroy_all(SANDBOX_ID, REGION, PREFIX, FAST)

    assert tagged(moto) == NOTHING_TAGGED


def test_a_teardown_that_cannot_finish_still_removes_the_rest_and_says_what_is_left(moto: Moto) -> None:
    make_bucket(moto)
    made = converge()
    moto.client("iam").tag_role(RoleName=f"{PREFIX}-{SANDBOX_ID}", Tags=[{"Key": "km:sandbox-id", "Value": "someone-else"}])

    with pytest.raises(TeardownIncomplete) as raised:
        destroy_all(SANDBOX_ID, REGION, PREFIX, FAST)

    assert raised.value.removed.instances == (made.instance.instance_id,)
    assert raised.value.removed.security_groups == (made.security_group_id,) and raised.value.removed.roles == ()
    assert "role: IAM role km-gebpfgk-1a2b3c4d exists but is tagged for someone-else" in str(raised.value)
    assert str(raised.value).endswith("run the destroy again")
    assert tagged(moto)["roles"] == [f"{PREFIX}-{SANDBOX_ID}"] and tagged(moto)["instances"] == []


def test_artifacts_are_kept(moto: Moto) -> None:
    make_bucket(moto)
    moto.client("s3").put_object(Bucket=BUCKET, Key=f"agent-runs/{SANDBOX_ID}/r1/output.json", Body=b"{}")
    converge()

    destroy_all(SANDBOX_ID, REGION, PREFIX, FAST)

    keys = [item["Key"] for item in moto.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert f"agent-runs/{SANDBOX_ID}/r1/output.json" in keys


def test_a_profile_that_mounts_efs_needs_an_efs_id(moto: Moto) -> None:
    goose = compiled()
    with pytest.raises(Ec2Error, match="mounts EFS .* no efs_id; run km init or set efs_id"):
        ensure_sandbox(
            REGION, sandbox_tags(goose), goose.plan, goose.userdata, artifacts_bucket=BUCKET, config=operator_config(efs_id=None)
        )
    assert tagged(moto)["roles"] == []  # refused before anything was made
