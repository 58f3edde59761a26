"""Claude Code: its invocation, and its outcome on the fake's real result objects and on failure shapes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from host_agent.agents.claude import ClaudeAdapter
from tests.unit.host_agent.agents.conftest import RunAgent, agent_env

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_invocation_puts_the_prompt_on_stdin_and_extra_args_last(tmp_path: Path) -> None:
    invocation = ClaudeAdapter().invocation(tmp_path / "prompt.md", ["--max-turns", "5"])
    assert invocation.argv == ["claude", "-p", "--output-format", "json", "--dangerously-skip-permissions", "--max-turns", "5"]
    assert invocation.env == {}
    assert invocation.prompt_on_stdin is True
    assert invocation.output_name == "output.json"


def test_a_shell_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="custom agent only"):
        ClaudeAdapter().invocation(tmp_path / "prompt.md", [], command="echo hi")


def test_a_successful_run_reports_claudes_own_figures(run_agent: RunAgent) -> None:
    run = run_agent(ClaudeAdapter(), "Fix the failing test\nin tests/unit")
    outcome = ClaudeAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert run.exit_code == 0
    assert outcome.is_error is False
    assert outcome.error is None
    assert outcome.result == "Done: Fix the failing test"
    assert outcome.session_id is not None and UUID.match(outcome.session_id)
    assert outcome.num_turns == 3
    assert outcome.duration_ms is not None and outcome.duration_ms >= 1840
    assert outcome.total_cost_usd == 0.0213834
    assert outcome.usage == {
        "input_tokens": 12,
        "output_tokens": 156,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 10240,
    }
    assert isinstance(outcome.raw, dict) and outcome.raw["type"] == "result" and outcome.raw["session_id"] == outcome.session_id


def test_a_failed_run_exits_1_with_the_error_subtype(run_agent: RunAgent) -> None:
    run = run_agent(ClaudeAdapter(), "please KM_FAKE_FAIL")
    outcome = ClaudeAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert run.exit_code == 1
    assert outcome.is_error is True
    assert outcome.error == "claude failed during execution (error_during_execution): fake failure requested by KM_FAKE_FAIL"
    assert outcome.result is None
    assert outcome.total_cost_usd == 0.0
    assert outcome.num_turns == 0


def test_is_error_with_exit_0_is_still_an_error(run_agent: RunAgent) -> None:
    run = run_agent(ClaudeAdapter(), "KM_FAKE_IS_ERROR")
    outcome = ClaudeAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert run.exit_code == 0
    assert outcome.is_error is True
    assert outcome.error is not None and outcome.error.startswith("API Error: 529")


def test_a_prompt_beyond_the_single_argument_limit_arrives_whole(run_agent: RunAgent) -> None:
    prompt = "Summarise this log\n" + "x" * (200 * 1024) + "\nKM_FAKE_ENV=KM_TEST_MARK"
    run = run_agent(ClaudeAdapter(), prompt, env={"KM_TEST_MARK": "tail-arrived"})
    outcome = ClaudeAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert outcome.result == "Done: Summarise this log [KM_TEST_MARK=tail-arrived]"


def test_the_fake_logs_the_argv_it_was_given(run_agent: RunAgent, tmp_path: Path) -> None:
    log = tmp_path / "argv.jsonl"
    run = run_agent(ClaudeAdapter(), "hello", extra_args=["--model", "opus"], env={"KM_FAKE_LOG": str(log)})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [run.invocation.argv]


def test_a_sleeping_run_dies_on_sighup(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.md"
    prompt_file.write_text("wait KM_FAKE_SLEEP=30")
    invocation = ClaudeAdapter().invocation(prompt_file, [])
    with prompt_file.open("rb") as prompt_stream:
        # SIGHUP's default action, whatever this test inherited (under nohup it is ignored, as is any child's).
        process = subprocess.Popen(
            invocation.argv,
            stdin=prompt_stream,
            stdout=subprocess.PIPE,
            env=agent_env(invocation),
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
        )
    try:
        process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGHUP)
    stdout, _ = process.communicate(timeout=10)
    outcome = ClaudeAdapter().outcome(stdout, process.returncode, "")
    assert process.returncode == -signal.SIGHUP
    assert outcome.is_error is True
    assert outcome.error == "claude was killed by signal 1 with nothing on stderr"


def _result(**fields: object) -> bytes:
    base: dict[str, object] = {"type": "result", "subtype": "success", "is_error": False, "result": "ok", "session_id": "s-1"}
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize(
    ("stdout", "exit_code", "stderr_tail", "error"),
    [
        (b"", 1, "node: out of memory\n", "claude exited 1: node: out of memory"),
        (b"Invalid API key \xc2\xb7 Please run /login\n", 1, "", "claude exited 1 with nothing on stderr"),
        (b"", 0, "", "claude printed no result object"),
        (
            _result(subtype="error_max_turns", is_error=True, result=None, num_turns=5),
            1,
            "",
            "claude stopped at its turn limit (error_max_turns)",
        ),
        (
            _result(subtype="error_max_budget_usd", is_error=True, result=None, errors=["budget $1.00 reached"]),
            1,
            "",
            "claude stopped at its budget limit (error_max_budget_usd): budget $1.00 reached",
        ),
        (
            _result(subtype="error_max_structured_output_retries", is_error=True, result=None),
            1,
            "",
            "claude reported error_max_structured_output_retries",
        ),
        (_result(), 137, "Killed\n", "claude exited 137: Killed"),
    ],
    ids=["empty-exit-1", "text-exit-1", "empty-exit-0", "max-turns", "max-budget", "unknown-error-subtype", "ok-but-exit-137"],
)
def test_failure_shapes_give_a_one_line_reason(stdout: bytes, exit_code: int, stderr_tail: str, error: str) -> None:
    outcome = ClaudeAdapter().outcome(stdout, exit_code, stderr_tail)
    assert outcome.is_error is True
    assert outcome.error == error


def test_unparseable_output_is_kept_as_bounded_text() -> None:
    outcome = ClaudeAdapter().outcome(b"z" * 100_000, 1, "")
    assert outcome.raw == "z" * 65536
    assert outcome.usage == dict.fromkeys(
        ["input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]
    )
    assert (outcome.session_id, outcome.num_turns, outcome.duration_ms, outcome.total_cost_usd) == (None, None, None, None)


def test_verbose_output_is_a_list_whose_last_result_counts() -> None:
    messages = [{"type": "system", "subtype": "init", "session_id": "s-2"}, json.loads(_result(session_id="s-2", num_turns=2))]
    outcome = ClaudeAdapter().outcome(json.dumps(messages).encode(), 0, "")
    assert (outcome.is_error, outcome.result, outcome.session_id, outcome.num_turns) == (False, "ok", "s-2", 2)
    assert outcome.raw == messages


def test_missing_fields_are_none_not_zero() -> None:
    outcome = ClaudeAdapter().outcome(_result(usage={"output_tokens": 7}), 0, "")
    assert outcome.total_cost_usd is None
    assert outcome.duration_ms is None
    assert outcome.usage["output_tokens"] == 7
    assert outcome.usage["input_tokens"] is None
