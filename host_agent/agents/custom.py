"""Any other agent CLI, given as a shell command (`--agent-cmd 'CMD'`); km knows nothing of its output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from host_agent.agents.base import AgentInvocation, AgentOutcome, bounded_text, exit_reason, token_usage


class CustomAdapter:
    """A command run by bash; its stdout is the result and its exit status the only error signal."""

    name = "custom"

    def invocation(self, prompt_file: Path, extra_args: Sequence[str], command: str | None = None) -> AgentInvocation:
        """The prompt arrives both on stdin and as KM_PROMPT_FILE, so the command can use whichever its tool
        takes. Extra args become the command's positional parameters ("$@"), with $0 set to `km-agent`."""
        if not command:
            raise ValueError("the custom agent needs a command (--agent-cmd 'CMD')")
        positional = ["km-agent", *extra_args] if extra_args else []
        return AgentInvocation(
            argv=["/bin/bash", "-c", command, *positional],
            env={"KM_PROMPT_FILE": str(prompt_file)},
            prompt_on_stdin=True,
            output_name="output.txt",
        )

    def outcome(self, stdout: bytes, exit_code: int, stderr_tail: str) -> AgentOutcome:
        """Only the text and the exit status are known; everything an agent would report is None."""
        text = bounded_text(stdout)
        return AgentOutcome(
            is_error=exit_code != 0,
            result=text,
            session_id=None,
            num_turns=None,
            duration_ms=None,
            total_cost_usd=None,
            usage=token_usage(),
            raw=text,
            error=exit_reason("custom agent", exit_code, stderr_tail) if exit_code != 0 else None,
        )
