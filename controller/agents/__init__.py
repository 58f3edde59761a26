"""Agent runs from the operator's side; `runs` holds the operations behind `km agent …`."""

from __future__ import annotations


class AgentRunError(Exception):
    """An agent operation that cannot be done; the message names the sandbox or run and the fix."""
