"""Codex: its invocation, its outcome on the fake's real JSONL events, and the cost computed from tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from host_agent.agents.codex import CODEX_DEFAULT_MODEL, CodexAdapter, codex_model
from host_agent.agents.pricing import openai_cost_usd
from tests.unit.host_agent.agents.conftest import RunAgent, agent_env


def test_invocation_reads_the_prompt_from_stdin_via_a_trailing_dash(tmp_path: Path) -> None:
    invocation = CodexAdapter().invocation(tmp_path / "prompt.md", ["-m", "gpt-5.4"])
    assert invocation.argv == [
        "codex",
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        "-m",
        "gpt-5.4",
        "-",
    ]
    assert (invocation.env, invocation.prompt_on_stdin, invocation.output_name) == ({}, True, "output.jsonl")


def test_a_successful_run_is_read_from_its_events(run_agent: RunAgent) -> None:
    adapter = CodexAdapter()
    run = run_agent(adapter, "Add a README\nwith usage")
    outcome = adapter.outcome(run.stdout, run.exit_code, run.stderr_tail)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.exit_code == 0
    assert outcome.is_error is False and outcome.error is None
    assert outcome.result == "Done: Add a README"
    assert outcome.session_id == events[0]["thread_id"]
    assert outcome.num_turns == 1
    assert outcome.duration_ms is None
    assert outcome.usage == {
        "input_tokens": 24763,
        "output_tokens": 122,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 24448,
    }
    # gpt-5.5 list price: 315 uncached input × $5 + 24448 cached × $0.50 + 122 output × $30, per 1M tokens.
    assert outcome.total_cost_usd == 0.017459
    assert outcome.raw == events


def test_the_cost_follows_the_model_in_the_extra_args(run_agent: RunAgent) -> None:
    adapter = CodexAdapter()
    run = run_agent(adapter, "hello", extra_args=["--model", "gpt-5.3-codex"])
    # 315 × $1.75 + 24448 × $0.175 + 122 × $14, per 1M tokens.
    assert adapter.outcome(run.stdout, run.exit_code, run.stderr_tail).total_cost_usd == 0.006538


def test_an_unknown_model_has_no_cost_rather_than_a_guess(run_agent: RunAgent) -> None:
    adapter = CodexAdapter()
    run = run_agent(adapter, "hello", extra_args=["-m", "my-finetune"])
    outcome = adapter.outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert outcome.total_cost_usd is None
    assert outcome.usage["output_tokens"] == 122


def test_an_adapter_that_made_no_invocation_prices_only_a_model_it_is_given(run_agent: RunAgent) -> None:
    run = run_agent(CodexAdapter(), "hello")
    assert CodexAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail).total_cost_usd is None
    # 315 × $1.25 + 24448 × $0.125 + 122 × $10, per 1M tokens.
    assert CodexAdapter(model="gpt-5").outcome(run.stdout, run.exit_code, run.stderr_tail).total_cost_usd == 0.004670


def test_a_failed_turn_exits_1_with_its_message(run_agent: RunAgent) -> None:
    adapter = CodexAdapter()
    run = run_agent(adapter, "KM_FAKE_FAIL")
    outcome = adapter.outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert run.exit_code == 1
    assert outcome.is_error is True
    assert outcome.error == "codex turn failed: fake failure requested by KM_FAKE_FAIL"
    assert (outcome.result, outcome.num_turns, outcome.total_cost_usd) == (None, 0, None)
    assert outcome.session_id is not None


def test_the_environment_reaches_the_agent(run_agent: RunAgent) -> None:
    adapter = CodexAdapter()
    run = run_agent(adapter, "check KM_FAKE_ENV=AWS_REGION", env={"AWS_REGION": "eu-west-1"})
    assert (
        adapter.outcome(run.stdout, run.exit_code, run.stderr_tail).result
        == "Done: check KM_FAKE_ENV=AWS_REGION [AWS_REGION=eu-west-1]"
    )


def test_a_sleeping_run_dies_on_sigterm_after_starting_its_thread(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.md"
    prompt_file.write_text("KM_FAKE_SLEEP=30")
    adapter = CodexAdapter()
    invocation = adapter.invocation(prompt_file, [])
    with prompt_file.open("rb") as prompt_stream:
        process = subprocess.Popen(invocation.argv, stdin=prompt_stream, stdout=subprocess.PIPE, env=agent_env(invocation))
    assert process.stdout is not None
    first_line = process.stdout.readline()
    os.kill(process.pid, signal.SIGTERM)
    rest, _ = process.communicate(timeout=10)
    outcome = adapter.outcome(first_line + rest, process.returncode, "")
    assert json.loads(first_line)["type"] == "thread.started"
    assert process.returncode == -signal.SIGTERM
    assert outcome.is_error is True
    assert outcome.error == "codex was killed by signal 15 with nothing on stderr"
    assert outcome.session_id == json.loads(first_line)["thread_id"]


def _jsonl(*events: dict[str, object]) -> bytes:
    return b"".join(json.dumps(event).encode() + b"\n" for event in events)


TURN = {"type": "turn.completed", "usage": {"input_tokens": 1000, "cached_input_tokens": 400, "output_tokens": 50}}


def test_usage_is_summed_over_turns_and_noise_lines_are_skipped() -> None:
    stdout = b"warning: something odd\n" + _jsonl(
        {"type": "thread.started", "thread_id": "t-1"},
        {"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": "first"}},
        TURN,
        {"type": "item.completed", "item": {"id": "item_1", "type": "agent_message", "text": "second"}},
        TURN,
    )
    outcome = CodexAdapter(model="gpt-5-mini").outcome(stdout, 0, "")
    assert (outcome.is_error, outcome.result, outcome.session_id, outcome.num_turns) == (False, "second", "t-1", 2)
    assert outcome.usage == {
        "input_tokens": 2000,
        "output_tokens": 100,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 800,
    }
    # 1200 × $0.25 + 800 × $0.025 + 100 × $2, per 1M tokens.
    assert outcome.total_cost_usd == 0.00052


@pytest.mark.parametrize(
    ("stdout", "exit_code", "stderr_tail", "error"),
    [
        (_jsonl({"type": "error", "message": "stream disconnected"}), 1, "", "codex error: stream disconnected"),
        (_jsonl({"type": "turn.failed", "error": {}}), 1, "", "codex turn failed"),
        (b"", 1, "Error: Not logged in\n", "codex exited 1: Error: Not logged in"),
        (_jsonl({"type": "thread.started", "thread_id": "t-1"}), 0, "", "codex ended without completing a turn"),
        (_jsonl(TURN), 2, "panic\n", "codex exited 2: panic"),
    ],
    ids=["error-event", "turn-failed-no-message", "nothing-printed", "no-turn-completed", "completed-but-exit-2"],
)
def test_failure_shapes_give_a_one_line_reason(stdout: bytes, exit_code: int, stderr_tail: str, error: str) -> None:
    outcome = CodexAdapter().outcome(stdout, exit_code, stderr_tail)
    assert outcome.is_error is True
    assert outcome.error == error


def test_unparseable_output_is_kept_as_text_with_nothing_known() -> None:
    outcome = CodexAdapter(model="gpt-5").outcome(b"Usage: codex exec [OPTIONS]\n", 2, "")
    assert outcome.raw == "Usage: codex exec [OPTIONS]\n"
    assert (outcome.num_turns, outcome.total_cost_usd, outcome.usage["input_tokens"]) == (None, None, None)


@pytest.mark.parametrize(
    ("extra_args", "model"),
    [
        ([], CODEX_DEFAULT_MODEL),
        (["-m", "gpt-5.4"], "gpt-5.4"),
        (["--model", "gpt-5.4-mini"], "gpt-5.4-mini"),
        (["--model=gpt-5.2"], "gpt-5.2"),
        (["-c", 'model="gpt-5"'], "gpt-5"),
        (["-m", "gpt-5", "--model", "gpt-5.4"], "gpt-5.4"),
        (["-c", "model_reasoning_effort=high"], CODEX_DEFAULT_MODEL),
    ],
)
def test_the_model_comes_from_the_last_model_flag(extra_args: list[str], model: str) -> None:
    assert codex_model(extra_args) == model


def test_cached_tokens_are_priced_apart_from_the_rest_of_the_input() -> None:
    assert openai_cost_usd("gpt-5", input_tokens=1_000_000, cached_input_tokens=0, output_tokens=1_000_000) == 11.25
    assert openai_cost_usd("gpt-5", input_tokens=1_000_000, cached_input_tokens=1_000_000, output_tokens=0) == 0.125
    assert openai_cost_usd("o3-unlisted", input_tokens=1, cached_input_tokens=0, output_tokens=1) is None
