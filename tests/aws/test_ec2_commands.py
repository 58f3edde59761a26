"""The ec2 substrate through the operator's own commands, as subprocesses against moto: `km init`, then
`km create goose` (the profile says ec2), list, a no-op re-create, stop, resume and destroy, with every
resource asserted through boto3 and nothing tagged with the sandbox left at the end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.aws.commands import DOIT, km
from tests.aws.conftest import Moto
from tests.aws.ec2_support import NOTHING_TAGGED, tagged
from tests.conftest import REPO_ROOT


def instance_state(moto: Moto, instance_id: str) -> str:
    [reservation] = moto.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservation["Instances"][0]["State"]["Name"])


def test_goose_on_ec2_from_create_to_destroy(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))  # the local store stays empty and private
    km("init")

    created: Any = json.loads(km("create", "goose", "--json").stdout)

    sandbox = created["sandbox"]
    sandbox_id = sandbox["id"]
    assert sandbox["status"] == "running" and sandbox["substrate"] == "ec2"
    resources = tagged(moto, sandbox_id)
    assert len(resources["instances"]) == 1 and len(resources["security_groups"]) == 1
    assert resources["roles"] == [f"km-{sandbox_id}"] and resources["instance_profiles"] == [f"km-{sandbox_id}"]
    [instance_id] = resources["instances"]
    row = moto.client("dynamodb").get_item(TableName="km-sandboxes", Key={"pk": {"S": f"sandbox#{sandbox_id}"}})["Item"]
    assert row["alias"]["S"] == "goose" and row["resources"]["M"]["instance_id"]["S"] == instance_id
    schedule = moto.client("scheduler").get_schedule(Name=f"km-ttl-{sandbox_id}", GroupName="default")
    assert schedule["Target"]["Arn"].endswith(":function:km-ttl-handler")
    listed = json.loads(km("list", "--json").stdout)
    assert [(entry["alias"], entry["id"]) for entry in listed] == [("goose", sandbox_id)]

    before = schedule["ScheduleExpression"]
    km("extend", "goose", "2h")
    moved = moto.client("scheduler").get_schedule(Name=f"km-ttl-{sandbox_id}", GroupName="default")["ScheduleExpression"]
    assert moved > before and len(moto.client("scheduler").list_schedules()["Schedules"]) == 1

    again = km("create", "goose")
    assert "up to date" in again.stdout + again.stderr
    assert tagged(moto, sandbox_id)["instances"] == [instance_id]  # nothing new was launched

    km("stop", "goose")
    assert instance_state(moto, instance_id) in ("stopping", "stopped")
    km("resume", "goose")
    assert instance_state(moto, instance_id) in ("pending", "running")

    km("destroy", "goose", "--yes")

    assert tagged(moto, sandbox_id) == NOTHING_TAGGED
    assert "Item" not in moto.client("dynamodb").get_item(TableName="km-sandboxes", Key={"pk": {"S": f"sandbox#{sandbox_id}"}})
    assert moto.client("scheduler").list_schedules()["Schedules"] == []
    assert json.loads(km("list", "--json").stdout) == []


def test_without_km_init_create_says_what_to_run(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))

    failed = km("create", "goose", expect=1)

    assert "run `km init`" in failed.stderr


def test_doit_create_and_destroy_goose_on_ec2(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    km("init")

    def doit(task: str) -> str:
        done = subprocess.run(
            [DOIT, "--db-file", str(tmp_path / "doit.db"), task],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            cwd=REPO_ROOT,
            timeout=300,
        )
        assert done.returncode == 0, f"doit {task}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    doit("create:goose")
    [entry] = json.loads(km("list", "--json").stdout)
    assert len(tagged(moto, entry["id"])["instances"]) == 1
    assert "up to date" in doit("create:goose")

    doit("destroy:goose")

    assert tagged(moto, entry["id"])["instances"] == [] and json.loads(km("list", "--json").stdout) == []
