"""Agent adapters: how to start each agent CLI headless and how to read what it printed.

Only the standard library is imported, because the run wrapper imports this on every run.
"""

from __future__ import annotations

from collections.abc import Callable

from host_agent.agents.base import AgentAdapter, AgentInvocation, AgentOutcome
from host_agent.agents.claude import ClaudeAdapter
from host_agent.agents.codex import CodexAdapter
from host_agent.agents.custom import CustomAdapter
from host_agent.agents.goose import GooseAdapter

_ADAPTERS: dict[str, Callable[[], AgentAdapter]] = {
    "claude": ClaudeAdapter,
    "codex": CodexAdapter,
    "goose": GooseAdapter,
    "custom": CustomAdapter,
}

AGENT_NAMES = tuple(_ADAPTERS)


def adapter_for(name: str) -> AgentAdapter:
    """A fresh adapter for an agent name as the CLI and host-agent.json spell it."""
    factory = _ADAPTERS.get(name)
    if factory is None:
        raise ValueError(f"unknown agent {name!r}: expected one of {', '.join(AGENT_NAMES)}")
    return factory()


__all__ = ["AGENT_NAMES", "AgentAdapter", "AgentInvocation", "AgentOutcome", "adapter_for"]
