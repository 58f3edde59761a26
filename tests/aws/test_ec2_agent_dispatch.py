"""`km agent` on ec2 through the operator's own commands against moto: a run goes to the instance as one
SSM Run Command (moto records it without running it, so the test reads back the exact document, target
and script), and results already uploaded to S3 are read from there without asking the instance."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.aws.commands import km
from tests.aws.conftest import Moto
from tests.aws.ec2_support import tagged

PROMPT = "fix the tests'; rm -rf / #\n$(whoami) ünïcode"


@pytest.fixture
def goose(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "cache"))
    km("init")
    sandbox: dict[str, Any] = json.loads(km("create", "goose", "--json").stdout)["sandbox"]
    yield sandbox
    km("destroy", "goose", "--yes")


def test_a_run_is_one_ssm_command_to_the_instance_with_the_prompt_on_stdin(goose: dict[str, Any], moto: Moto) -> None:
    [instance_id] = tagged(moto, goose["id"])["instances"]

    # moto answers every command with success and no output: km must say so, not crash or pretend.
    answered = km("agent", "run", "goose", "--prompt", PROMPT, "--wait", expect=1)

    assert "km-host-agent run answered nothing (exit code 0), not JSON" in answered.stderr
    assert "Traceback" not in answered.stderr
    [command] = moto.client("ssm").list_commands()["Commands"]
    assert command["DocumentName"] == "AWS-RunShellScript" and command["InstanceIds"] == [instance_id]
    [script] = command["Parameters"]["commands"]
    match = re.fullmatch(r"printf %s ([A-Za-z0-9+/=]+) \| base64 -d \| /usr/local/bin/km-host-agent run (.*)", script)
    assert match, script
    assert base64.b64decode(match.group(1)).decode() == PROMPT  # the operator's text only ever travels as data
    assert match.group(2).split()[-1] == "--wait" and "whoami" not in script


def test_uploaded_results_are_read_from_s3_without_asking_the_instance(goose: dict[str, Any], moto: Moto) -> None:
    bucket = goose["resources"]["bucket"]
    result = {"run_id": "20261128T030000-abcd", "status": "complete", "result": "done", "total_cost_usd": 0.12}
    prefix = f"agent-runs/{goose['id']}/{result['run_id']}"
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/status", Body=b"complete\n")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/result.json", Body=json.dumps(result).encode())

    printed = json.loads(km("agent", "results", "goose").stdout)

    assert printed == result
    assert moto.client("ssm").list_commands()["Commands"] == []
