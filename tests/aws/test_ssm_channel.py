"""The ec2 channel: the exact SSM command km sends (moto records it; it does not run it), the script's
handling of the operator's text, and how invocation states end a wait."""

from __future__ import annotations

import subprocess
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from controller.channel import ssm as channel
from controller.channel.ssm import ChannelError, SsmChannel, host_agent_script
from tests.aws.conftest import Moto

COMMAND_ID = "0b6a1a3e-5d0c-4c4b-9d57-3f4b1d3c2a10"
INSTANCE = "i-0123456789abcdef0"
NASTY = 'fix it\'; rm -rf / #\n$(whoami) `id` "quoted" ünïcode\n'


def instance(moto: Moto) -> str:
    ec2 = moto.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    return str(ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def test_the_command_sent_is_run_shell_script_calling_the_host_agent(moto: Moto) -> None:
    target = instance(moto)

    result = SsmChannel("us-east-1").host_agent(target, ["run", "--agent", "claude", "--wait"], input_text="hello", timeout=60)

    assert result.returncode == 0
    [sent] = moto.client("ssm").list_commands(CommandId=result.command_id)["Commands"]
    assert sent["DocumentName"] == "AWS-RunShellScript"
    assert sent["InstanceIds"] == [target]
    assert sent["Parameters"]["commands"] == [host_agent_script(["run", "--agent", "claude", "--wait"], "hello")]
    assert sent["Parameters"]["executionTimeout"] == ["60"]


def test_the_operators_text_reaches_stdin_unchanged_and_never_as_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "HOST_AGENT", "cat")  # stands in for km-host-agent: echoes its stdin

    script = host_agent_script(["run"], NASTY)
    ran = subprocess.run(["bash", "-c", script.replace("cat run", "cat")], capture_output=True, text=True, check=True)

    assert ran.stdout == NASTY
    assert "rm -rf" not in script and "whoami" not in script


def test_arguments_are_quoted() -> None:
    assert host_agent_script(["results", "--run", "a b;c"]) == "/usr/local/bin/km-host-agent results --run 'a b;c' </dev/null"


def stubbed(responses: list[dict[str, Any] | str]) -> tuple[Any, Stubber]:
    """An SSM client answering GetCommandInvocation from `responses` (a string is an error code)."""
    ssm = boto3.client("ssm", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(ssm)
    for response in responses:
        if isinstance(response, str):
            stubber.add_client_error("get_command_invocation", service_error_code=response)
        else:
            stubber.add_response("get_command_invocation", response)
    stubber.activate()
    return ssm, stubber


def test_a_wait_polls_from_a_fifth_of_a_second_until_the_command_ends() -> None:
    ssm, stubber = stubbed(
        [
            "InvocationDoesNotExist",
            {"Status": "Pending"},
            {"Status": "InProgress"},
            {"Status": "Failed", "ResponseCode": 3, "StandardOutputContent": "{}", "StandardErrorContent": "no run"},
        ]
    )
    slept: list[float] = []

    result = SsmChannel("us-east-1", sleep=slept.append)._wait(ssm, INSTANCE, COMMAND_ID, timeout=60)

    assert (result.returncode, result.stderr) == (3, "no run")
    assert slept == pytest.approx([0.2, 0.3, 0.45])
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize("status", ["TimedOut", "Cancelled", "Undeliverable"])
def test_a_command_that_never_ran_is_an_error_naming_the_instance(status: str) -> None:
    ssm, _ = stubbed([{"Status": status, "StatusDetails": status}])

    with pytest.raises(ChannelError, match=f"on {INSTANCE} ended {status}"):
        SsmChannel("us-east-1", sleep=lambda _: None)._wait(ssm, INSTANCE, COMMAND_ID, timeout=60)


def test_a_command_still_running_at_the_timeout_is_an_error() -> None:
    ssm, _ = stubbed([{"Status": "InProgress"}] * 3)

    with pytest.raises(ChannelError, match="still InProgress"):
        SsmChannel("us-east-1", sleep=lambda _: None)._wait(ssm, INSTANCE, COMMAND_ID, timeout=0.3)
