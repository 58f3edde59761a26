"""A policy change on ec2 is applied live, as on the local substrate: `km create` on the edited profile
sends the compiled policy update (host-agent.json, the environment, configFiles, then a reload) through
SSM to the same instance, and the record and the TTL schedule follow. moto records the command without
running it; the script itself is run for real by the local-substrate lifecycle test."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from controller.profile import ProfileResolver, load_profile
from tests.aws.commands import km
from tests.aws.conftest import Moto
from tests.aws.ec2_support import tagged
from tests.conftest import REPO_ROOT


def sent_script(command: dict[str, Any]) -> str:
    """The bash script inside `printf %s <base64> | base64 -d | /bin/bash -s`."""
    [line] = command["Parameters"]["commands"]
    match = re.fullmatch(r"printf %s ([A-Za-z0-9+/=]+) \| base64 -d \| /bin/bash -s", line)
    assert match, line
    return base64.b64decode(match.group(1)).decode()


def test_a_policy_change_reaches_the_same_instance_through_ssm(
    moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    profile = tmp_path / "goose.yaml"
    original = (REPO_ROOT / "profiles" / "goose.yaml").read_text()
    profile.write_text(original)
    km("init")
    sandbox = json.loads(km("create", str(profile), "--json").stdout)["sandbox"]
    [instance_id] = tagged(moto, sandbox["id"])["instances"]
    schedule_before = moto.client("scheduler").get_schedule(Name=f"km-ttl-{sandbox['id']}")["ScheduleExpression"]

    profile.write_text(
        original.replace('ttl: "4h"', 'ttl: "6h"')
        .replace("GOOSE_MODEL: us.anthropic.claude-opus-4-6-v1", "GOOSE_MODEL: changed-model")
        .replace('{"trustedDirectories":["/home/sandbox","/workspace"]}', '{"trustedDirectories":["/workspace"]}')
    )
    dry = km("create", str(profile), "--dry-run")
    assert "would goose: update in place (" in dry.stdout and "spec.lifecycle.ttl" in dry.stdout
    assert moto.client("ssm").list_commands()["Commands"] == []  # a dry run sends nothing
    updated = json.loads(km("create", str(profile), "--json").stdout)

    assert updated["action"] == "update" and updated["sandbox"]["id"] == sandbox["id"]
    assert tagged(moto, sandbox["id"])["instances"] == [instance_id]  # no new instance
    [command] = moto.client("ssm").list_commands()["Commands"]
    assert command["DocumentName"] == "AWS-RunShellScript" and command["InstanceIds"] == [instance_id]
    expected = compile_profile(load_profile(str(profile), ProfileResolver())[0]).policy_update
    script = sent_script(command)
    assert script == expected
    assert "export GOOSE_MODEL=changed-model" in script and '{"trustedDirectories":["/workspace"]}' in script
    assert script.rstrip().endswith("systemctl reload km-host-agent.service")

    record = updated["sandbox"]
    assert record["policy_hash"] != sandbox["policy_hash"] and record["runtime_hash"] == sandbox["runtime_hash"]
    assert record["ttl_expiry"] > sandbox["ttl_expiry"]
    schedule_after = moto.client("scheduler").get_schedule(Name=f"km-ttl-{sandbox['id']}")["ScheduleExpression"]
    assert schedule_after > schedule_before
    assert "up to date" in km("create", str(profile)).stdout  # and converged: nothing more to send
    assert len(moto.client("ssm").list_commands()["Commands"]) == 1
    km("destroy", "goose", "--yes")


def test_a_stopped_sandbox_is_not_updated_behind_its_back(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    profile = tmp_path / "goose.yaml"
    original = (REPO_ROOT / "profiles" / "goose.yaml").read_text()
    profile.write_text(original)
    km("init")
    km("create", str(profile))
    km("stop", "goose")
    profile.write_text(original.replace("GOOSE_MODEL: us.anthropic.claude-opus-4-6-v1", "GOOSE_MODEL: changed-model"))

    refused = km("create", str(profile), expect=1)

    assert "is stopped; resume it before changing its policy" in refused.stderr and "Traceback" not in refused.stderr
    assert moto.client("ssm").list_commands()["Commands"] == []
    km("destroy", "goose", "--yes")
