"""The sandbox's IAM role and instance profile, both named `<prefix>-<sandbox_id>`.

The role trusts EC2 only, carries one inline policy (the compiled iam-policy.json with the sandbox's
names filled in) and no managed policies; its MaxSessionDuration comes from the profile. IAM names are
unique in the account, so these are found by name and claimed only when their tags say they are this
sandbox's.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, is_aws_error
from controller.substrates.ec2.tags import SANDBOX_ID_TAG, SandboxRef, SandboxTags, tag_dict, tags_differ

TRUST_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}
INLINE_POLICY_NAME = "km-sandbox"
_PLACEHOLDER = "${km:"


def ensure_role(region: str, tags: SandboxTags, policy: Mapping[str, Any], max_session_seconds: int) -> str:
    """The role with the EC2 trust policy, `policy` inline, the session length and tags as given; returns its ARN.

    `policy` is the rendered document (`controller.compiler.render_iam_policy`); one with placeholders
    left in is refused, since IAM would accept it and grant nothing useful.
    """
    if _PLACEHOLDER in json.dumps(policy):
        raise Ec2Error(
            f"the IAM policy for {tags.sandbox_id} still has ${{km:…}} placeholders; render it with render_iam_policy first"
        )
    iam = client("iam", region)
    name = tags.name
    try:
        role = _get_role(iam, name)
        present_policy: dict[str, Any] | None = None
        if role is None:
            role = _create_role(iam, tags, max_session_seconds)
        else:
            _claim(tags, "role", name, role.get("Tags"))
            if _document(role.get("AssumeRolePolicyDocument")) != TRUST_POLICY:
                iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(TRUST_POLICY))
            if role.get("MaxSessionDuration") != max_session_seconds:
                iam.update_role(RoleName=name, MaxSessionDuration=max_session_seconds)
            if tags_differ(role.get("Tags"), tags.tags()):
                iam.tag_role(RoleName=name, Tags=tags.tags())
            present_policy = _inline_policy(iam, name)
        if present_policy != dict(policy):
            iam.put_role_policy(
                RoleName=name, PolicyName=INLINE_POLICY_NAME, PolicyDocument=json.dumps(policy, separators=(",", ":"))
            )
    except Exception as error:
        if not is_aws_error(error):
            raise
        raise as_ec2_error(error, f"converging IAM role {name}") from None
    return str(role["Arn"])


def ensure_instance_profile(region: str, tags: SandboxTags, role_name: str) -> str:
    """The instance profile `<prefix>-<sandbox_id>` holding exactly `role_name`; returns its ARN."""
    iam = client("iam", region)
    name = tags.name
    try:
        profile = _get_instance_profile(iam, name)
        if profile is None:
            profile = _create_instance_profile(iam, tags)
        _claim(tags, "instance profile", name, profile.get("Tags"))
        if tags_differ(profile.get("Tags"), tags.tags()):
            iam.tag_instance_profile(InstanceProfileName=name, Tags=tags.tags())
        held = [role["RoleName"] for role in profile.get("Roles", [])]
        for other in held:
            if other != role_name:
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=other)
        if role_name not in held:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role_name)
    except Exception as error:
        if not is_aws_error(error):
            raise
        raise as_ec2_error(error, f"converging instance profile {name}") from None
    return str(profile["Arn"])


def delete_instance_profile(region: str, ref: SandboxRef) -> bool:
    """Take the role out of the sandbox's instance profile and delete it; False when there was none."""
    iam = client("iam", region)
    profile = _get_instance_profile(iam, ref.name)
    if profile is None:
        return False
    _claim(ref, "instance profile", ref.name, profile.get("Tags"))
    for role in profile.get("Roles", []):
        _tolerate_missing(iam.remove_role_from_instance_profile, InstanceProfileName=ref.name, RoleName=role["RoleName"])
    return _tolerate_missing(iam.delete_instance_profile, InstanceProfileName=ref.name)


def delete_role(region: str, ref: SandboxRef) -> bool:
    """Delete the sandbox's role after what holds it (policies, instance profiles); False when there was none."""
    iam = client("iam", region)
    name = ref.name
    role = _get_role(iam, name)
    if role is None:
        return False
    _claim(ref, "role", name, role.get("Tags"))
    try:
        for page in iam.get_paginator("list_role_policies").paginate(RoleName=name):
            for policy_name in page["PolicyNames"]:
                _tolerate_missing(iam.delete_role_policy, RoleName=name, PolicyName=policy_name)
        for page in iam.get_paginator("list_attached_role_policies").paginate(RoleName=name):
            for attached in page["AttachedPolicies"]:
                _tolerate_missing(iam.detach_role_policy, RoleName=name, PolicyArn=attached["PolicyArn"])
        for page in iam.get_paginator("list_instance_profiles_for_role").paginate(RoleName=name):
            for profile in page["InstanceProfiles"]:
                _tolerate_missing(
                    iam.remove_role_from_instance_profile, InstanceProfileName=profile["InstanceProfileName"], RoleName=name
                )
    except Exception as error:
        if is_aws_error(error, "NoSuchEntity"):
            return False
        raise
    return _tolerate_missing(iam.delete_role, RoleName=name)


def _create_role(iam: Any, tags: SandboxTags, max_session_seconds: int) -> dict[str, Any]:
    try:
        role: dict[str, Any] = iam.create_role(
            RoleName=tags.name,
            AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
            Description=f"km sandbox {tags.sandbox_id}",
            MaxSessionDuration=max_session_seconds,
            Tags=tags.tags(),
        )["Role"]
    except Exception as error:
        if not is_aws_error(error, "EntityAlreadyExists"):
            raise
        raise Ec2Error(
            f"IAM role {tags.name} appeared while km was creating it; another km run is converging {tags.sandbox_id}"
        ) from None
    return role


def _create_instance_profile(iam: Any, tags: SandboxTags) -> dict[str, Any]:
    try:
        profile: dict[str, Any] = iam.create_instance_profile(InstanceProfileName=tags.name, Tags=tags.tags())["InstanceProfile"]
    except Exception as error:
        if not is_aws_error(error, "EntityAlreadyExists"):
            raise
        raise Ec2Error(
            f"instance profile {tags.name} appeared while km was creating it; another km run is converging {tags.sandbox_id}"
        ) from None
    return profile


def _get_role(iam: Any, name: str) -> dict[str, Any] | None:
    try:
        return dict(iam.get_role(RoleName=name)["Role"])
    except Exception as error:
        if is_aws_error(error, "NoSuchEntity"):
            return None
        raise


def _get_instance_profile(iam: Any, name: str) -> dict[str, Any] | None:
    try:
        return dict(iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"])
    except Exception as error:
        if is_aws_error(error, "NoSuchEntity"):
            return None
        raise


def _inline_policy(iam: Any, role_name: str) -> dict[str, Any] | None:
    try:
        return _document(iam.get_role_policy(RoleName=role_name, PolicyName=INLINE_POLICY_NAME)["PolicyDocument"])
    except Exception as error:
        if is_aws_error(error, "NoSuchEntity"):
            return None
        raise


def _document(value: Any) -> dict[str, Any] | None:
    """A policy document as data; botocore decodes IAM's URL-encoded JSON, but be sure of it."""
    if value is None or isinstance(value, dict):
        return value
    decoded: dict[str, Any] = json.loads(urllib.parse.unquote(str(value)))
    return decoded


def _claim(ref: SandboxRef, kind: str, name: str, tags: Any) -> None:
    """Refuse to touch an IAM resource with the sandbox's name that is not tagged as the sandbox's."""
    if not ref.owns(tags):
        owner = tag_dict(tags).get(SANDBOX_ID_TAG)
        raise Ec2Error(
            f"IAM {kind} {name} exists but is tagged for {owner or 'no km sandbox'}, not {ref.sandbox_id}; "
            f"km leaves it alone: delete it, or use another resource_prefix"
        )


def _tolerate_missing(call: Any, **arguments: Any) -> bool:
    """Run one IAM delete; False when the thing was already gone."""
    try:
        call(**arguments)
    except Exception as error:
        if is_aws_error(error, "NoSuchEntity"):
            return False
        raise
    return True
