"""The ec2 substrate's channel into a sandbox: SSM Run Command calling `km-host-agent …` on the instance.

One `SendCommand` with the `AWS-RunShellScript` document, then `GetCommandInvocation` until the command
ends, polling from 0.2 s (most control commands answer in well under a second, and waiting whole seconds
would make every `km agent` call feel slow) up to 2 s between polls. Standard input (a prompt) travels
base64-encoded inside the script, so no quoting of the operator's text can break out of it.
"""

from __future__ import annotations

import base64
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controller.aws.clients import client, error_code

DOCUMENT = "AWS-RunShellScript"
FIRST_POLL_SECONDS = 0.2
MAX_POLL_SECONDS = 2.0
POLL_GROWTH = 1.5
HOST_AGENT = "/usr/local/bin/km-host-agent"
_RUNNING = frozenset({"Pending", "InProgress", "Delayed"})


class ChannelError(Exception):
    """The command could not be run or did not finish; the message names the instance and SSM's status."""


@dataclass(frozen=True)
class CommandResult:
    """What the command printed and how it ended (SSM truncates output at 24 000 characters)."""

    returncode: int
    stdout: str
    stderr: str
    command_id: str


def host_agent_script(args: Sequence[str], input_text: str | None = None) -> str:
    """The shell line that runs `km-host-agent ARGS`, with `input_text` on its standard input."""
    command = " ".join(shlex.quote(part) for part in (HOST_AGENT, *args))
    if input_text is None:
        return f"{command} </dev/null"
    encoded = base64.b64encode(input_text.encode()).decode()
    return f"printf %s {encoded} | base64 -d | {command}"


def bash_script(script: str) -> str:
    """The shell line that runs a whole bash script (whatever the document's shell is: dash on Debian)."""
    encoded = base64.b64encode(script.encode()).decode()
    return f"printf %s {encoded} | base64 -d | /bin/bash -s"


class SsmChannel:
    def __init__(self, region: str, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.region = region
        self._sleep = sleep

    def run(self, instance_id: str, script: str, *, timeout: float = 120.0) -> CommandResult:
        """Run one shell script on the instance as root and wait for it (up to `timeout` seconds)."""
        ssm = client("ssm", self.region)
        try:
            sent = ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName=DOCUMENT,
                Parameters={"commands": [script], "executionTimeout": [str(max(int(timeout), 30))]},
                TimeoutSeconds=max(int(timeout), 30),
                Comment="km control command",
            )
        except Exception as error:
            raise ChannelError(f"SSM SendCommand to {instance_id} failed: {error}") from error
        command_id = str(sent["Command"]["CommandId"])
        return self._wait(ssm, instance_id, command_id, timeout)

    def host_agent(
        self, instance_id: str, args: Sequence[str], *, input_text: str | None = None, timeout: float = 120.0
    ) -> CommandResult:
        return self.run(instance_id, host_agent_script(args, input_text), timeout=timeout)

    def _wait(self, ssm: Any, instance_id: str, command_id: str, timeout: float) -> CommandResult:
        deadline = time.monotonic() + timeout
        delay = FIRST_POLL_SECONDS
        while True:
            try:
                invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            except Exception as error:
                # Right after SendCommand the invocation may not exist yet: keep polling.
                if error_code(error) != "InvocationDoesNotExist":
                    raise ChannelError(f"SSM GetCommandInvocation {command_id} on {instance_id} failed: {error}") from error
                invocation = {"Status": "Pending"}
            status = str(invocation.get("Status"))
            if status not in _RUNNING:
                return _result(instance_id, command_id, status, invocation)
            if time.monotonic() + delay > deadline:
                raise ChannelError(f"command {command_id} on {instance_id} still {status} after {timeout:.0f} s")
            self._sleep(delay)
            delay = min(delay * POLL_GROWTH, MAX_POLL_SECONDS)


def _result(instance_id: str, command_id: str, status: str, invocation: dict[str, Any]) -> CommandResult:
    stdout = str(invocation.get("StandardOutputContent", ""))
    stderr = str(invocation.get("StandardErrorContent", ""))
    code = invocation.get("ResponseCode", -1)
    if status == "Success":
        return CommandResult(0, stdout, stderr, command_id)
    if status == "Failed" and isinstance(code, int) and code >= 0:
        return CommandResult(code, stdout, stderr, command_id)
    detail = invocation.get("StatusDetails") or status
    raise ChannelError(f"command {command_id} on {instance_id} ended {detail}: {stderr.strip()[-500:] or 'no output'}")
