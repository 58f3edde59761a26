"""Goose: its invocation, its outcome on the fake's real stream-json records, and its silent exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from host_agent.agents.goose import GooseAdapter
from tests.unit.host_agent.agents.conftest import RunAgent

SILENT_EXIT = "goose exited 1 without a result (a tool needed approval?)"


def test_invocation_names_the_prompt_file_and_sets_auto_mode(tmp_path: Path) -> None:
    invocation = GooseAdapter().invocation(tmp_path / "prompt.md", ["--max-turns", "20"])
    assert invocation.argv == [
        "goose",
        "run",
        "--quiet",
        "--output-format",
        "stream-json",
        "-i",
        str(tmp_path / "prompt.md"),
        "--max-turns",
        "20",
    ]
    assert invocation.env == {"GOOSE_MODE": "auto"}
    assert invocation.prompt_on_stdin is False
    assert invocation.output_name == "output.jsonl"


def test_a_successful_run_is_read_from_its_records(run_agent: RunAgent) -> None:
    run = run_agent(GooseAdapter(), "Tidy the imports\nin src/")
    outcome = GooseAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.exit_code == 0
    assert outcome.is_error is False and outcome.error is None
    # The answer streamed as two records of one message; it comes back whole.
    assert outcome.result == "Done: Tidy the imports"
    assert outcome.usage == {
        "input_tokens": 3300,
        "output_tokens": 234,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }
    assert (outcome.session_id, outcome.num_turns, outcome.duration_ms, outcome.total_cost_usd) == (None, None, None, None)
    assert outcome.raw == records
    assert [record["type"] for record in records][-1] == "complete"


def test_a_failed_run_is_the_silent_exit_1(run_agent: RunAgent) -> None:
    run = run_agent(GooseAdapter(), "KM_FAKE_FAIL")
    outcome = GooseAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail)
    assert (run.exit_code, run.stdout) == (1, b"")
    assert outcome.is_error is True
    assert outcome.error == SILENT_EXIT
    assert outcome.raw == ""


def test_without_auto_mode_goose_stops_silently(run_agent: RunAgent) -> None:
    run = run_agent(GooseAdapter(), "hello", env={"GOOSE_MODE": "smart_approve"})
    assert (run.exit_code, run.stdout) == (1, b"")
    assert GooseAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail).error == SILENT_EXIT


def test_the_environment_reaches_the_agent(run_agent: RunAgent) -> None:
    run = run_agent(GooseAdapter(), "KM_FAKE_ENV=GOOSE_MODE")
    assert (
        GooseAdapter().outcome(run.stdout, run.exit_code, run.stderr_tail).result
        == "Done: KM_FAKE_ENV=GOOSE_MODE [GOOSE_MODE=auto]"
    )


def _jsonl(*records: dict[str, object]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def _assistant(message_id: str | None, text: str) -> dict[str, object]:
    return {"type": "message", "message": {"id": message_id, "role": "assistant", "content": [{"type": "text", "text": text}]}}


COMPLETE = {"type": "complete", "total_tokens": 30, "input_tokens": 20, "output_tokens": 10}


@pytest.mark.parametrize(
    ("stdout", "exit_code", "stderr_tail", "error"),
    [
        (
            _jsonl({"type": "error", "error": "Request failed: 401"}, COMPLETE),
            0,
            "",
            "goose reported an error: Request failed: 401",
        ),
        (
            _jsonl({"type": "error", "error": "context length exceeded"}),
            1,
            "",
            "goose reported an error: context length exceeded",
        ),
        (
            b"",
            1,
            "Error: No provider configured. Run 'goose configure' first\n",
            f"{SILENT_EXIT}: Error: No provider configured. Run 'goose configure' first",
        ),
        (_jsonl(_assistant("m1", "half an answer")), 0, "", "goose ended without a complete record"),
        (_jsonl(COMPLETE), 2, "", "goose exited 2 with nothing on stderr"),
        (b"", -9, "", "goose was killed by signal 9 with nothing on stderr"),
    ],
    ids=["error-then-complete", "error-exit-1", "setup-failure", "no-complete-exit-0", "complete-but-exit-2", "killed"],
)
def test_failure_shapes_give_a_one_line_reason(stdout: bytes, exit_code: int, stderr_tail: str, error: str) -> None:
    outcome = GooseAdapter().outcome(stdout, exit_code, stderr_tail)
    assert outcome.is_error is True
    assert outcome.error == error


def test_the_result_is_the_last_assistant_message_not_all_of_them() -> None:
    stdout = _jsonl(
        _assistant("m1", "Looking"),
        _assistant("m1", " around."),
        {"type": "message", "message": {"id": "m2", "role": "user", "content": [{"type": "text", "text": "tool output"}]}},
        _assistant("m3", "All "),
        _assistant("m3", "done."),
        {"type": "message", "message": {"id": "m4", "role": "assistant", "content": [{"type": "toolRequest", "id": "c1"}]}},
        COMPLETE,
    )
    outcome = GooseAdapter().outcome(stdout, 0, "")
    assert (outcome.is_error, outcome.result) == (False, "All done.")


def test_messages_without_ids_are_not_joined() -> None:
    outcome = GooseAdapter().outcome(_jsonl(_assistant(None, "one"), _assistant(None, "two"), COMPLETE), 0, "")
    assert outcome.result == "two"
