"""The sandbox's role and instance profile: EC2 trust, the compiled policy inline with the sandbox's names,
the profile's session length, found by name and claimed only by tag, and deletes that take any partial state."""

from __future__ import annotations

import json

import pytest

from controller.compiler import render_iam_policy
from controller.substrates.ec2 import (
    Ec2Error,
    SandboxRef,
    delete_instance_profile,
    delete_role,
    ec2_plan,
    ensure_instance_profile,
    ensure_role,
)
from controller.substrates.ec2.iam import INLINE_POLICY_NAME, TRUST_POLICY
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import BUCKET, PREFIX, SANDBOX_ID, aws_calls, compiled, compiled_variant, reads, sandbox_tags, writes

NAME = f"{PREFIX}-{SANDBOX_ID}"
READ_S3 = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}


def goose_policy() -> dict[str, object]:
    return render_iam_policy(compiled().iam_policy, SANDBOX_ID, BUCKET)


def test_the_role_trusts_ec2_and_carries_the_compiled_policy(moto: Moto) -> None:
    goose = compiled()
    shape = ec2_plan(goose.plan)

    arn = ensure_role(REGION, sandbox_tags(goose), goose_policy(), shape.role_session_seconds)

    iam = moto.client("iam")
    role = iam.get_role(RoleName=NAME)["Role"]
    assert arn == role["Arn"] == f"arn:aws:iam::123456789012:role/{NAME}"
    assert role["AssumeRolePolicyDocument"] == {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
    assert role["MaxSessionDuration"] == 3600  # goose: roleSessionDuration 1h
    assert iam.list_role_policies(RoleName=NAME)["PolicyNames"] == [INLINE_POLICY_NAME]
    document = iam.get_role_policy(RoleName=NAME, PolicyName=INLINE_POLICY_NAME)["PolicyDocument"]
    assert document == json.loads(
        json.dumps(goose.iam_policy).replace("${km:SandboxId}", SANDBOX_ID).replace("${km:ArtifactsBucket}", BUCKET)
    )
    assert f"arn:aws:s3:::{BUCKET}/agent-runs/{SANDBOX_ID}/*" in json.dumps(document)
    assert iam.list_attached_role_policies(RoleName=NAME)["AttachedPolicies"] == []
    assert {t["Key"]: t["Value"] for t in role["Tags"]} == {
        "km:sandbox-id": SANDBOX_ID,
        "km:profile": "goose",
        "km:plan-hash": goose.hash,
        "km:resource-prefix": PREFIX,
        "Name": NAME,
    }


def test_the_session_length_follows_the_profile(moto: Moto, tmp_path: object) -> None:
    plan = compiled_variant(tmp_path, lambda spec: spec["identity"].update(roleSessionDuration="4h30m"))  # type: ignore[arg-type]

    ensure_role(REGION, sandbox_tags(plan), goose_policy(), ec2_plan(plan.plan).role_session_seconds)

    assert moto.client("iam").get_role(RoleName=NAME)["Role"]["MaxSessionDuration"] == 16200


def test_the_instance_profile_holds_the_role(moto: Moto) -> None:
    tags = sandbox_tags(compiled())
    ensure_role(REGION, tags, goose_policy(), 3600)

    arn = ensure_instance_profile(REGION, tags, NAME)

    profile = moto.client("iam").get_instance_profile(InstanceProfileName=NAME)["InstanceProfile"]
    assert arn == profile["Arn"] == f"arn:aws:iam::123456789012:instance-profile/{NAME}"
    assert [role["RoleName"] for role in profile["Roles"]] == [NAME]
    assert {t["Key"]: t["Value"] for t in profile["Tags"]}["km:sandbox-id"] == SANDBOX_ID


def test_second_runs_read_and_write_nothing_more(moto: Moto) -> None:
    tags = sandbox_tags(compiled())
    role_arn = ensure_role(REGION, tags, goose_policy(), 3600)
    profile_arn = ensure_instance_profile(REGION, tags, NAME)

    with aws_calls() as calls:
        assert ensure_role(REGION, tags, goose_policy(), 3600) == role_arn
        assert ensure_instance_profile(REGION, tags, NAME) == profile_arn

    assert reads(calls) == {"iam.GetRole": 1, "iam.GetRolePolicy": 1, "iam.GetInstanceProfile": 1}
    assert writes(calls) == {}
    iam = moto.client("iam")
    assert [r["RoleName"] for r in iam.list_roles()["Roles"]] == [NAME]
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]] == [NAME]


def test_drift_is_repaired(moto: Moto) -> None:
    tags = sandbox_tags(compiled())
    ensure_role(REGION, tags, goose_policy(), 3600)
    ensure_instance_profile(REGION, tags, NAME)
    iam = moto.client("iam")
    widened = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_role_policy(RoleName=NAME, PolicyName=INLINE_POLICY_NAME, PolicyDocument=json.dumps(widened))
    iam.update_role(RoleName=NAME, MaxSessionDuration=7200)
    iam.update_assume_role_policy(
        RoleName=NAME,
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
        ),
    )
    iam.remove_role_from_instance_profile(InstanceProfileName=NAME, RoleName=NAME)

    ensure_role(REGION, tags, goose_policy(), 3600)
    ensure_instance_profile(REGION, tags, NAME)

    role = iam.get_role(RoleName=NAME)["Role"]
    assert role["AssumeRolePolicyDocument"] == TRUST_POLICY and role["MaxSessionDuration"] == 3600
    assert iam.get_role_policy(RoleName=NAME, PolicyName=INLINE_POLICY_NAME)["PolicyDocument"] == goose_policy()
    assert [r["RoleName"] for r in iam.get_instance_profile(InstanceProfileName=NAME)["InstanceProfile"]["Roles"]] == [NAME]


def test_a_policy_with_placeholders_is_refused() -> None:
    with pytest.raises(Ec2Error, match="placeholders; render it with render_iam_policy first"):
        ensure_role(REGION, sandbox_tags(compiled()), compiled().iam_policy, 3600)


def test_a_role_with_the_name_but_not_the_tags_is_left_alone(moto: Moto) -> None:
    moto.client("iam").create_role(RoleName=NAME, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY))

    with pytest.raises(Ec2Error, match=f"IAM role {NAME} exists but is tagged for no km sandbox"):
        ensure_role(REGION, sandbox_tags(compiled()), goose_policy(), 3600)
    with pytest.raises(Ec2Error, match="km leaves it alone"):
        delete_role(REGION, SandboxRef(SANDBOX_ID, PREFIX))
    assert moto.client("iam").get_role(RoleName=NAME)["Role"]["RoleName"] == NAME


@pytest.mark.parametrize("made", ["nothing", "role", "role and policy", "role and profile", "profile alone"])
def test_deletes_take_any_partial_state(moto: Moto, made: str) -> None:
    tags, ref = sandbox_tags(compiled()), SandboxRef(SANDBOX_ID, PREFIX)
    iam = moto.client("iam")
    if made.startswith("role"):
        ensure_role(REGION, tags, goose_policy(), 3600)
        if made == "role":
            iam.delete_role_policy(RoleName=NAME, PolicyName=INLINE_POLICY_NAME)
        managed = iam.create_policy(
            PolicyName="attached-by-hand", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [READ_S3]})
        )
        iam.attach_role_policy(RoleName=NAME, PolicyArn=managed["Policy"]["Arn"])
    if made in ("role and profile", "profile alone"):
        iam.create_instance_profile(InstanceProfileName=NAME, Tags=tags.tags())
        if made == "role and profile":
            iam.add_role_to_instance_profile(InstanceProfileName=NAME, RoleName=NAME)

    profile_deleted = delete_instance_profile(REGION, ref)
    role_deleted = delete_role(REGION, ref)

    assert profile_deleted == ("profile" in made)
    assert role_deleted == made.startswith("role")
    assert iam.list_roles()["Roles"] == [] and iam.list_instance_profiles()["InstanceProfiles"] == []
    assert (delete_instance_profile(REGION, ref), delete_role(REGION, ref)) == (False, False)


def test_a_role_still_in_its_profile_is_deleted_too(moto: Moto) -> None:
    tags = sandbox_tags(compiled())
    ensure_role(REGION, tags, goose_policy(), 3600)
    ensure_instance_profile(REGION, tags, NAME)

    assert delete_role(REGION, SandboxRef(SANDBOX_ID, PREFIX)) is True  # before the profile: the role is taken out first

    profile = moto.client("iam").get_instance_profile(InstanceProfileName=NAME)["InstanceProfile"]
    assert profile["Roles"] == []
