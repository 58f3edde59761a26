"""Pure pieces of the ec2 substrate: what it reads from a compiled plan, the tags it writes, and the user data
that gives a sandbox its identity before the compiled boot script runs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.substrates.ec2 import DataVolume, Ec2Error, SandboxRef, ec2_plan
from controller.substrates.ec2.userdata import sandbox_userdata
from host_agent.config import load_identity
from tests.aws.ec2_support import SANDBOX_ID, compiled, compiled_variant, sandbox_tags


def test_goose_shape() -> None:
    shape = ec2_plan(compiled().plan)

    assert (shape.instance_type, shape.ami, shape.root_device, shape.root_size_gib) == (
        "t3.medium",
        "amazon-linux-2023",
        "/dev/xvda",
        15,
    )
    assert (shape.spot, shape.hibernation, shape.role_session_seconds, shape.mounts_efs) == (False, True, 3600, True)
    assert shape.data_volumes == (DataVolume("/dev/sdf", 20, False, "/data"),)
    assert [rule["to"] for rule in shape.egress] == ["0.0.0.0/0", "vpc-resolver", "vpc-resolver", "efs"]


def test_no_identity_section_means_an_hour(tmp_path: Path) -> None:
    plan = compiled_variant(tmp_path, lambda spec: spec.pop("identity")).plan
    assert ec2_plan(plan).role_session_seconds == 3600


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda plan: plan.pop("volumes"), "the compiled plan has no 'volumes'; recompile"),
        (lambda plan: plan["sandbox"].update(substrate="local"), "plan is for the 'local' substrate"),
        (lambda plan: plan["profile"]["spec"]["identity"].update(roleSessionDuration="13h"), "outside IAM's 1h to 12h"),
    ],
)
def test_an_unusable_plan_is_refused_before_anything_is_made(edit: Any, message: str) -> None:
    import copy

    plan = copy.deepcopy(compiled().plan)
    edit(plan)
    with pytest.raises(Ec2Error, match=message):
        ec2_plan(plan)


def test_tags_and_filters() -> None:
    goose = compiled()
    tags = sandbox_tags(goose)

    assert tags.name == f"km-{SANDBOX_ID}"
    assert tags.tags("x", {"km:device": "/dev/sdf"}) == [
        {"Key": "km:sandbox-id", "Value": SANDBOX_ID},
        {"Key": "km:profile", "Value": "goose"},
        {"Key": "km:plan-hash", "Value": goose.hash},
        {"Key": "km:resource-prefix", "Value": "km"},
        {"Key": "Name", "Value": "x"},
        {"Key": "km:device", "Value": "/dev/sdf"},
    ]
    assert tags.filters() == [
        {"Name": "tag:km:sandbox-id", "Values": [SANDBOX_ID]},
        {"Name": "tag:km:resource-prefix", "Values": ["km"]},
    ]
    assert tags.owns(tags.tags())
    assert not SandboxRef(SANDBOX_ID, "other").owns(tags.tags())
    assert not tags.owns(None)


def test_the_user_data_writes_the_identity_then_runs_the_compiled_script_unchanged(tmp_path: Path) -> None:
    goose = compiled()
    identity = {
        "KM_SANDBOX_ID": SANDBOX_ID,
        "KM_ALIAS": "my goose",
        "KM_ARTIFACTS_URI": "s3://bucket",
        "KM_DNS_UPSTREAM": "172.31.0.2",
    }

    userdata = sandbox_userdata(goose.userdata, identity)

    assert userdata.endswith("\n" + goose.userdata)
    assert subprocess.run(["bash", "-n"], input=userdata, text=True, timeout=30).returncode == 0
    prelude = userdata[: -len(goose.userdata)].replace("/etc/km", str(tmp_path))
    subprocess.run(["bash", "-c", prelude], check=True, timeout=30)
    read = load_identity(tmp_path / "sandbox.env")
    assert (read.sandbox_id, read.alias, read.artifacts_uri, read.dns_upstream) == (
        SANDBOX_ID,
        "my goose",
        "s3://bucket",
        "172.31.0.2",
    )
    sourced = subprocess.run(
        ["bash", "-c", f'set -a; . {tmp_path / "sandbox.env"}; echo "$KM_ALIAS"'], capture_output=True, text=True, check=True
    )
    assert sourced.stdout == "my goose\n"  # the compiled script sources it: quoting keeps values whole


@pytest.mark.parametrize("identity", [{"KM_X": "two\nlines"}, {"lower": "x"}, {"KM X": "x"}])
def test_an_identity_that_cannot_be_written_is_refused(identity: dict[str, str]) -> None:
    with pytest.raises(Ec2Error, match="cannot be written to /etc/km/sandbox.env"):
        sandbox_userdata("#!/bin/bash\n", identity)
