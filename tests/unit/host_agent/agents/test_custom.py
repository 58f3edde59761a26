"""A custom agent command: bash runs it, the prompt arrives on stdin and in KM_PROMPT_FILE, stdout is the result."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.agents.custom import CustomAdapter
from tests.unit.host_agent.agents.conftest import RunAgent


def test_invocation_runs_the_command_with_bash(tmp_path: Path) -> None:
    invocation = CustomAdapter().invocation(tmp_path / "prompt.md", [], command="aider --yes")
    assert invocation.argv == ["/bin/bash", "-c", "aider --yes"]
    assert invocation.env == {"KM_PROMPT_FILE": str(tmp_path / "prompt.md")}
    assert invocation.prompt_on_stdin is True
    assert invocation.output_name == "output.txt"


def test_extra_args_become_the_commands_positional_parameters(tmp_path: Path) -> None:
    invocation = CustomAdapter().invocation(tmp_path / "prompt.md", ["--fast", "x y"], command='agent "$@"')
    assert invocation.argv == ["/bin/bash", "-c", 'agent "$@"', "km-agent", "--fast", "x y"]


@pytest.mark.parametrize("command", [None, ""])
def test_a_command_is_required(tmp_path: Path, command: str | None) -> None:
    with pytest.raises(ValueError, match=r"--agent-cmd"):
        CustomAdapter().invocation(tmp_path / "prompt.md", [], command=command)


def test_the_prompt_arrives_on_stdin_and_as_a_file(run_agent: RunAgent) -> None:
    run = run_agent(
        CustomAdapter(), "Write a haiku", extra_args=["x y"], command='tr a-z A-Z; echo; cat "$KM_PROMPT_FILE"; echo " [$1]"'
    )
    outcome = CustomAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert outcome.is_error is False and outcome.error is None
    assert outcome.result == "WRITE A HAIKU\nWrite a haiku [x y]\n"
    assert outcome.raw == outcome.result
    assert (outcome.session_id, outcome.num_turns, outcome.duration_ms, outcome.total_cost_usd) == (None, None, None, None)
    assert set(outcome.usage.values()) == {None}


def test_a_non_zero_exit_is_an_error_with_stderrs_last_line(run_agent: RunAgent) -> None:
    run = run_agent(CustomAdapter(), "hi", command="echo partial; echo 'boom: no model' >&2; exit 3")
    outcome = CustomAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert (outcome.is_error, outcome.result) == (True, "partial\n")
    assert outcome.error == "custom agent exited 3: boom: no model"


def test_the_result_is_cut_at_64_kib() -> None:
    outcome = CustomAdapter().outcome(b"y" * 70_000, 0, "")
    assert outcome.result == "y" * 65536
