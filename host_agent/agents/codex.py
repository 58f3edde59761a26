"""OpenAI Codex run headless: `codex exec --json`, which prints one JSON event per line."""

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
from host_agent.agents.pricing import openai_cost_usd

# The model Codex's documentation recommends and its CLI uses when nothing names another
# (https://developers.openai.com/codex/models, November 2026). A `model` set in ~/.codex/config.toml is
# invisible here, so profiles that change the model should pass `-m` in the agent args for the cost to follow.
CODEX_DEFAULT_MODEL = "gpt-5.5"


class CodexAdapter:
    """Codex reports tokens per turn but no cost; the cost is computed from the model's list price."""

    name = "codex"

    def __init__(self, model: str | None = None) -> None:
        """`model` prices the outcome; `invocation()` sets it from the args it was given. A wrapper that reads
        an earlier run's output with a fresh adapter passes `codex_model(extra_args)` here, or gets no cost."""
        self.model = model

    def invocation(self, prompt_file: Path, extra_args: Sequence[str], command: str | None = None) -> AgentInvocation:
        """The trailing `-` makes `codex exec` read the prompt from stdin. Approvals and Codex's own sandbox
        are off because km's sandbox is the boundary, and a headless run has nobody to approve anything."""
        if command is not None:
            raise ValueError("--agent-cmd applies to the custom agent only, not to codex")
        self.model = codex_model(extra_args)
        return AgentInvocation(
            argv=[
                "codex",
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox",
                *extra_args,
                "-",
            ],
            env={},
            prompt_on_stdin=True,
            output_name="output.jsonl",
        )

    def outcome(self, stdout: bytes, exit_code: int, stderr_tail: str) -> AgentOutcome:
        """Session from `thread.started`, answer from the last agent message, usage summed over turns.

        Usage is kept as Codex counts it: `input_tokens` includes the cached ones (OpenAI's convention),
        unlike Claude's, where cache reads are counted apart from `input_tokens`."""
        events = json_lines(stdout)
        turns = [event for event in events if event.get("type") == "turn.completed"]
        input_tokens = _summed(turns, "input_tokens")
        cached_input_tokens = _summed(turns, "cached_input_tokens")
        output_tokens = _summed(turns, "output_tokens")
        failure = _failure(events)
        if failure is None and exit_code != 0:
            failure = exit_reason("codex", exit_code, stderr_tail)
        if failure is None and not turns:
            failure = "codex ended without completing a turn"
        return AgentOutcome(
            is_error=failure is not None,
            result=_last_agent_message(events),
            session_id=_thread_id(events),
            num_turns=len(turns) if events else None,
            duration_ms=None,
            total_cost_usd=(
                openai_cost_usd(self.model, input_tokens, cached_input_tokens or 0, output_tokens)
                if self.model is not None and input_tokens is not None and output_tokens is not None
                else None
            ),
            usage=token_usage(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_creation_input_tokens=None,
                cache_read_input_tokens=cached_input_tokens,
            ),
            raw=events if events else bounded_text(stdout),
            error=failure,
        )


def codex_model(extra_args: Sequence[str]) -> str:
    """The model a run uses: the last `-m`/`--model` (or `-c model=…`) in the args, else Codex's default."""
    model = CODEX_DEFAULT_MODEL
    args = list(extra_args)
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in ("-m", "--model") and following is not None:
            model = following
        elif arg.startswith("--model="):
            model = arg.removeprefix("--model=")
        elif arg in ("-c", "--config") and following is not None and following.replace(" ", "").startswith("model="):
            model = following.split("=", 1)[1].strip().strip("'\"")
    return model


def _summed(turns: list[dict[str, object]], key: str) -> int | None:
    """A usage field summed over turns; None when no turn reported it (so "unknown" never reads as 0)."""
    counts = [int_or_none(usage.get(key)) for turn in turns if isinstance(usage := turn.get("usage"), dict)]
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def _failure(events: list[dict[str, object]]) -> str | None:
    """The reason of the last `turn.failed` or top-level `error` event, which is what ended the run."""
    for event in reversed(events):
        if event.get("type") == "turn.failed":
            error = event.get("error")
            message = str_or_none(error.get("message")) if isinstance(error, dict) else None
            return one_line(f"codex turn failed: {message}" if message else "codex turn failed")
        if event.get("type") == "error":
            message = str_or_none(event.get("message"))
            return one_line(f"codex error: {message}" if message else "codex reported an error")
    return None


def _thread_id(events: list[dict[str, object]]) -> str | None:
    """Codex's thread id is what `codex exec resume` takes, so it is the run's session id."""
    for event in events:
        if event.get("type") == "thread.started":
            return str_or_none(event.get("thread_id"))
    return None


def _last_agent_message(events: list[dict[str, object]]) -> str | None:
    for event in reversed(events):
        item = event.get("item")
        if event.get("type") == "item.completed" and isinstance(item, dict) and item.get("type") == "agent_message":
            return str_or_none(item.get("text"))
    return None
