"""Shared pieces of the EC2 substrate tests: compiled built-in profiles, the sandbox they become, and an
AWS call counter on km's own boto3 session."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from controller.aws import clients
from controller.aws.config import OperatorConfig
from controller.compiler import CompiledPlan, compile_profile
from controller.profile import BUILTIN_PROFILES_DIR, ProfileResolver, load_profile
from controller.substrates.ec2 import Polling, SandboxTags
from tests.aws.conftest import REGION, Moto
from tests.helpers import goose_variant

PREFIX = "km"
SANDBOX_ID = "gebpfgk-1a2b3c4d"
BUCKET = "km-artifacts-123456789012-us-east-1"
EFS_ID = "fs-0123456789abcdef0"
# moto changes state on the next look, so waits finish at once; a short interval keeps a miss cheap.
FAST = Polling(interval_seconds=0.01, timeout_seconds=5.0)
READS = ("Describe", "Get", "List", "Head")


@functools.cache
def compiled(name: str = "goose") -> CompiledPlan:
    """A built-in profile, loaded and compiled as `km create` would."""
    profile, _ = load_profile(BUILTIN_PROFILES_DIR / f"{name}.yaml", ProfileResolver())
    return compile_profile(profile)


def compiled_variant(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> CompiledPlan:
    """goose with one edit to its spec."""
    return compile_profile(goose_variant(tmp_path, edit))


def sandbox_tags(plan: CompiledPlan, sandbox_id: str = SANDBOX_ID) -> SandboxTags:
    return SandboxTags.for_plan(sandbox_id, PREFIX, plan.plan)


def operator_config(**fields: Any) -> OperatorConfig:
    return OperatorConfig.model_validate({"efs_id": EFS_ID, **fields})


def make_bucket(moto: Moto) -> None:
    moto.client("s3").create_bucket(Bucket=BUCKET)


@contextmanager
def aws_calls() -> Iterator[Counter[str]]:
    """Count the AWS operations km's clients make (`ec2.DescribeInstances`, …) inside the block."""
    seen: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        seen[f"{model.service_model.service_name}.{model.name}"] += 1

    events = clients._session(REGION).events
    events.register("before-call", count)
    try:
        yield seen
    finally:
        events.unregister("before-call", count)


def reads(calls: Counter[str]) -> Counter[str]:
    return Counter({name: n for name, n in calls.items() if name.split(".", 1)[1].startswith(READS)})


def writes(calls: Counter[str]) -> Counter[str]:
    return Counter({name: n for name, n in calls.items() if not name.split(".", 1)[1].startswith(READS)})


# What `tagged` returns once a sandbox is entirely gone.
NOTHING_TAGGED: dict[str, list[str]] = {
    "instances": [],
    "volumes": [],
    "security_groups": [],
    "roles": [],
    "instance_profiles": [],
}


def tagged(moto: Moto, sandbox_id: str = SANDBOX_ID) -> dict[str, list[str]]:
    """Everything in the account that still belongs to the sandbox (terminated instances do not count)."""
    ec2, iam = moto.client("ec2"), moto.client("iam")
    by_tag = [{"Name": "tag:km:sandbox-id", "Values": [sandbox_id]}]
    instances = [
        item["InstanceId"]
        for reservation in ec2.describe_instances(Filters=by_tag)["Reservations"]
        for item in reservation["Instances"]
        if item["State"]["Name"] != "terminated"
    ]
    roles = [role["RoleName"] for role in iam.list_roles()["Roles"] if sandbox_id in role["RoleName"]]
    profiles = [
        p["InstanceProfileName"]
        for p in iam.list_instance_profiles()["InstanceProfiles"]
        if sandbox_id in p["InstanceProfileName"]
    ]
    return {
        "instances": instances,
        "volumes": [volume["VolumeId"] for volume in ec2.describe_volumes(Filters=by_tag)["Volumes"]],
        "security_groups": [group["GroupId"] for group in ec2.describe_security_groups(Filters=by_tag)["SecurityGroups"]],
        "roles": roles,
        "instance_profiles": profiles,
    }


def only_instance(moto: Moto, sandbox_id: str = SANDBOX_ID) -> dict[str, Any]:
    reservations = moto.client("ec2").describe_instances(
        Filters=[
            {"Name": "tag:km:sandbox-id", "Values": [sandbox_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )["Reservations"]
    found = [item for reservation in reservations for item in reservation["Instances"]]
    assert len(found) == 1, found
    return dict(found[0])
