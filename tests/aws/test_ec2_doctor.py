"""`km doctor --ec2` against moto: a healthy account has nothing to report; resources whose sandbox lost
its record are each named, and `--fix` tears them down the way `km destroy` does, leaving the shared
resources of `km init` alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.state.dynamodb import DynamoDBStateStore
from tests.aws.commands import km
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import NOTHING_TAGGED, tagged


def test_orphans_are_named_and_fixed(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    km("init")
    sandbox_id = json.loads(km("create", "goose", "--json").stdout)["sandbox"]["id"]
    assert km("doctor", "--ec2").stdout.strip() == "0 leftover(s) found"
    resources = tagged(moto, sandbox_id)
    DynamoDBStateStore("km-sandboxes", REGION).delete(sandbox_id)  # the record is lost, the resources are not

    found = json.loads(km("doctor", "--ec2", "--json", expect=1).stdout)["found"]

    assert {item["sandbox_id"] for item in found} == {sandbox_id}
    kinds = sorted(item["kind"] for item in found)
    assert kinds == ["instance", "instance-profile", "role", "schedule", "security-group", "volume", "volume"], found
    assert {item["detail"] for item in found if item["kind"] == "instance"} == set(resources["instances"])
    assert {item["detail"] for item in found if item["kind"] == "role"} == {f"km-{sandbox_id}"}

    fixed = km("doctor", "--ec2", "--fix")

    assert fixed.stdout.strip().endswith("7 leftover(s) found, 7 removed"), fixed.stdout
    assert tagged(moto, sandbox_id) == NOTHING_TAGGED
    assert moto.client("scheduler").list_schedules()["Schedules"] == []
    roles = {role["RoleName"] for role in moto.client("iam").list_roles()["Roles"]}
    assert {"km-ttl-handler", "km-ttl-scheduler"} <= roles  # km init's own are not sandboxes'
    assert km("doctor", "--ec2").returncode == 0


def test_it_must_be_told_where_to_look() -> None:
    refused = km("doctor", expect=2)
    assert "--local (this host), --ec2 (the AWS account)" in refused.stderr
