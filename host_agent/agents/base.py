"""What every agent adapter promises: how to start the agent, and what its output means.

An adapter is pure: `invocation()` turns a prompt file and the operator's extra arguments into an argv
and environment, and `outcome()` turns the agent's raw stdout and exit code into one normalised record.
The run wrapper does the effectful part (exec, tmux, files) and never needs to know an agent's format.
Only the standard library is used here: the run wrapper imports this on every run and must start fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Raw text kept in an outcome is bounded: it is stored in run records, and an agent that floods stdout
# must not turn one run record into megabytes.
TEXT_LIMIT_BYTES = 64 * 1024

# A one-line reason is meant for a status column, not for a log.
REASON_LIMIT_CHARS = 300

USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass(frozen=True)
class AgentInvocation:
    """How to start one agent run; the caller resolves argv[0] on PATH and wires the prompt as told.

    The prompt travels as a file (on stdin, or named in argv) rather than as an argument because a
    prompt can exceed Linux's 128 KiB limit on a single argument.
    """

    argv: list[str]
    env: dict[str, str]
    prompt_on_stdin: bool
    output_name: str


@dataclass(frozen=True)
class AgentOutcome:
    """What one run produced, in the same shape for every agent so run records compare across agents.

    A value the agent did not report is None, never an estimate: a run record that says 0 tokens or
    $0.00 when the truth is unknown would mislead budget accounting.
    """

    is_error: bool
    result: str | None
    session_id: str | None
    num_turns: int | None
    duration_ms: int | None
    total_cost_usd: float | None
    usage: dict[str, int | None]
    raw: object
    error: str | None


class AgentAdapter(Protocol):
    """One agent CLI's headless interface: how to start it and how to read what it printed."""

    name: str

    def invocation(self, prompt_file: Path, extra_args: Sequence[str], command: str | None = None) -> AgentInvocation:
        """The argv, environment and prompt wiring for one run."""
        ...

    def outcome(self, stdout: bytes, exit_code: int, stderr_tail: str) -> AgentOutcome:
        """The normalised result of a finished run; never raises, whatever the agent printed."""
        ...


def token_usage(
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    cache_creation_input_tokens: int | None = None,
    cache_read_input_tokens: int | None = None,
) -> dict[str, int | None]:
    """A usage mapping with exactly the four keys every outcome carries, so consumers never probe for keys."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation_input_tokens,
        "cache_read_input_tokens": cache_read_input_tokens,
    }


def bounded_text(stdout: bytes) -> str:
    """Output as text, cut at TEXT_LIMIT_BYTES; undecodable bytes become U+FFFD rather than failing the run record."""
    return stdout[:TEXT_LIMIT_BYTES].decode("utf-8", errors="replace")


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed to single spaces and the length capped, for a status line."""
    line = " ".join(text.split())
    return line if len(line) <= REASON_LIMIT_CHARS else line[: REASON_LIMIT_CHARS - 1] + "…"


def exit_reason(agent: str, exit_code: int, stderr_tail: str) -> str:
    """Why a run failed when the agent's own output says nothing: the exit status and stderr's last line."""
    status = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited {exit_code}"
    last_lines = [line for line in stderr_tail.splitlines() if line.strip()]
    return one_line(f"{agent} {status}: {last_lines[-1]}" if last_lines else f"{agent} {status} with nothing on stderr")


def int_or_none(value: object) -> int | None:
    """A count from parsed JSON, or None when it is absent or not a number (JSON booleans are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def float_or_none(value: object) -> float | None:
    """An amount from parsed JSON, or None when it is absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def str_or_none(value: object) -> str | None:
    """A string from parsed JSON, or None when it is absent or another type."""
    return value if isinstance(value, str) else None


def json_lines(stdout: bytes) -> list[dict[str, object]]:
    """The JSON objects of a JSONL stream; lines that are not objects (a banner, a stray warning) are skipped."""
    records: list[dict[str, object]] = []
    for line in stdout.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
