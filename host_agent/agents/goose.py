"""Block's Goose run headless: `goose run --output-format stream-json`, which prints one record per line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from host_agent.agents.base import (
    AgentInvocation,
    AgentOutcome,
    bounded_text,
    exit_reason,
    int_or_none,
    json_lines,
    one_line,
    str_or_none,
    token_usage,
)


class GooseAdapter:
    """Goose reports tokens in its final `complete` record, and no session id, turn count, duration or cost."""

    name = "goose"

    def invocation(self, prompt_file: Path, extra_args: Sequence[str], command: str | None = None) -> AgentInvocation:
        """Goose reads the prompt file itself (`-i`). `--quiet` keeps its banner off stdout so the output
        stays pure JSONL. GOOSE_MODE=auto because in any approving mode a headless run that meets a tool
        needing approval exits 1 silently; km's sandbox is the boundary instead."""
        if command is not None:
            raise ValueError("--agent-cmd applies to the custom agent only, not to goose")
        return AgentInvocation(
            argv=["goose", "run", "--quiet", "--output-format", "stream-json", "-i", str(prompt_file), *extra_args],
            env={"GOOSE_MODE": "auto"},
            prompt_on_stdin=False,
            output_name="output.jsonl",
        )

    def outcome(self, stdout: bytes, exit_code: int, stderr_tail: str) -> AgentOutcome:
        """A run succeeded only with a `complete` record, no `error` record and exit 0: Goose can emit an
        error and still complete, and it can exit 1 having printed neither."""
        records = json_lines(stdout)
        complete = next((record for record in reversed(records) if record.get("type") == "complete"), None)
        failure = _failure(records, complete, exit_code, stderr_tail)
        return AgentOutcome(
            is_error=failure is not None,
            result=_last_assistant_text(records),
            session_id=None,
            num_turns=None,
            duration_ms=None,
            total_cost_usd=None,
            usage=token_usage(
                input_tokens=int_or_none(complete.get("input_tokens")) if complete else None,
                output_tokens=int_or_none(complete.get("output_tokens")) if complete else None,
            ),
            raw=records if records else bounded_text(stdout),
            error=failure,
        )


def _failure(
    records: list[dict[str, object]], complete: dict[str, object] | None, exit_code: int, stderr_tail: str
) -> str | None:
    errors = [str_or_none(record.get("error")) or "" for record in records if record.get("type") == "error"]
    if errors:
        return one_line(f"goose reported an error: {errors[-1]}" if errors[-1] else "goose reported an error")
    if complete is None and exit_code == 1:
        # Goose's "silent exit 1": a tool needing approval in a headless run ends it with no record at all.
        # Setup failures look the same on stdout, so stderr's last line is added when there is one.
        silent_exit = "goose exited 1 without a result (a tool needed approval?)"
        stderr_lines = [line for line in stderr_tail.splitlines() if line.strip()]
        return one_line(f"{silent_exit}: {stderr_lines[-1]}" if stderr_lines else silent_exit)
    if exit_code != 0:
        return exit_reason("goose", exit_code, stderr_tail)
    if complete is None:
        return "goose ended without a complete record"
    return None


def _last_assistant_text(records: list[dict[str, object]]) -> str | None:
    """The text of the last assistant message. Goose streams one message as several records sharing an id,
    so consecutive records with the same id are joined back into one message."""
    last_text: str | None = None
    last_id: object = None
    for record in records:
        message = record.get("message")
        if record.get("type") != "message" or not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        text = "".join(
            str_or_none(block.get("text")) or "" for block in blocks if isinstance(block, dict) and block.get("type") == "text"
        )
        if not text:
            continue
        message_id = message.get("id")
        if last_text is not None and message_id is not None and message_id == last_id:
            last_text += text
        else:
            last_text = text
        last_id = message_id
    return last_text
