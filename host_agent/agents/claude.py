"""Claude Code run headless: `claude -p --output-format json`, which prints one result object."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from host_agent.agents.base import (
    AgentInvocation,
    AgentOutcome,
    bounded_text,
    exit_reason,
    float_or_none,
    int_or_none,
    json_lines,
    one_line,
    str_or_none,
    token_usage,
)

# Claude's own words for why a run stopped early, turned into a reason an operator can act on.
_SUBTYPE_REASONS = {
    "error_max_turns": "claude stopped at its turn limit (error_max_turns)",
    "error_max_budget_usd": "claude stopped at its budget limit (error_max_budget_usd)",
    "error_during_execution": "claude failed during execution (error_during_execution)",
}


class ClaudeAdapter:
    """Claude Code, km's default agent; it reports cost, turns and session natively."""

    name = "claude"

    def invocation(self, prompt_file: Path, extra_args: Sequence[str], command: str | None = None) -> AgentInvocation:
        """`-p` reads the prompt from stdin when no prompt argument is given, which has no size limit."""
        if command is not None:
            raise ValueError("--agent-cmd applies to the custom agent only, not to claude")
        return AgentInvocation(
            argv=["claude", "-p", "--output-format", "json", "--dangerously-skip-permissions", *extra_args],
            env={},
            prompt_on_stdin=True,
            output_name="output.json",
        )

    def outcome(self, stdout: bytes, exit_code: int, stderr_tail: str) -> AgentOutcome:
        """Everything comes from the result object; without one, the exit status and stderr are all there is."""
        parsed = _parsed(stdout)
        result_object = _result_object(parsed)
        if result_object is None:
            reason = exit_reason("claude", exit_code, stderr_tail) if exit_code != 0 else "claude printed no result object"
            return AgentOutcome(
                is_error=True,
                result=None,
                session_id=None,
                num_turns=None,
                duration_ms=None,
                total_cost_usd=None,
                usage=token_usage(),
                raw=parsed if parsed is not None else bounded_text(stdout),
                error=reason,
            )
        raw_usage = result_object.get("usage")
        usage = raw_usage if isinstance(raw_usage, dict) else {}
        result = str_or_none(result_object.get("result"))
        is_error = result_object.get("is_error") is True or exit_code != 0
        return AgentOutcome(
            is_error=is_error,
            result=result,
            session_id=str_or_none(result_object.get("session_id")),
            num_turns=int_or_none(result_object.get("num_turns")),
            duration_ms=int_or_none(result_object.get("duration_ms")),
            total_cost_usd=float_or_none(result_object.get("total_cost_usd")),
            usage=token_usage(
                input_tokens=int_or_none(usage.get("input_tokens")),
                output_tokens=int_or_none(usage.get("output_tokens")),
                cache_creation_input_tokens=int_or_none(usage.get("cache_creation_input_tokens")),
                cache_read_input_tokens=int_or_none(usage.get("cache_read_input_tokens")),
            ),
            raw=parsed,
            error=_error_reason(result_object, result, exit_code, stderr_tail) if is_error else None,
        )


def _parsed(stdout: bytes) -> object | None:
    """The output as JSON: one document normally (a list of messages under `--verbose`), or the lines that
    parse when extra args chose `stream-json`; None when nothing parses."""
    try:
        parsed: object = json.loads(stdout)
    except ValueError:
        return json_lines(stdout) or None
    return parsed


def _result_object(parsed: object | None) -> dict[str, object] | None:
    """The last `type: result` object, which is where Claude puts a run's totals."""
    candidates = parsed if isinstance(parsed, list) else [parsed]
    for candidate in reversed(candidates):
        if isinstance(candidate, dict) and candidate.get("type") == "result":
            return candidate
    return None


def _error_reason(result_object: dict[str, object], result: str | None, exit_code: int, stderr_tail: str) -> str:
    subtype = str_or_none(result_object.get("subtype")) or ""
    errors = result_object.get("errors")
    detail = next((str(error) for error in errors if str(error).strip()), "") if isinstance(errors, list) else ""
    if subtype in _SUBTYPE_REASONS:
        return one_line(f"{_SUBTYPE_REASONS[subtype]}: {detail}" if detail else _SUBTYPE_REASONS[subtype])
    if subtype.startswith("error"):
        return one_line(f"claude reported {subtype}: {detail}" if detail else f"claude reported {subtype}")
    if result_object.get("is_error") is True and result:
        # A successful subtype flagged as an error is how Claude reports API failures ("API Error: 529 …").
        return one_line(result)
    return exit_reason("claude", exit_code, stderr_tail)
