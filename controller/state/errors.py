"""The errors the state store raises, each carrying what the operator needs to act on it.

The CLI turns a `StateError` into one line and an exit code, so every message names the sandbox or
alias involved and says what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence


class StateError(Exception):
    """The state store could not do what was asked; the message names the sandbox and the fix."""


class AliasTaken(StateError):
    """A sandbox with this alias already exists; aliases are unique among sandboxes that exist."""

    def __init__(self, alias: str, sandbox_id: str) -> None:
        self.alias = alias
        self.sandbox_id = sandbox_id
        super().__init__(
            f"alias {alias!r} is already used by sandbox {sandbox_id}; "
            f"destroy that sandbox first (`km destroy {alias}`) or pick another name with --alias"
        )


class SandboxNotFound(StateError):
    """No sandbox matches `ref`; `tried` says how it was looked up (id, alias, list number)."""

    def __init__(self, ref: str, tried: Sequence[str] = ("id",)) -> None:
        self.ref = ref
        self.tried = tuple(tried)
        super().__init__(
            f"no sandbox matches {ref!r} as {_either(self.tried)}; it may have been destroyed. "
            "Run `km list` to see the sandboxes there are"
        )


def _either(ways: tuple[str, ...]) -> str:
    """`('id', 'alias', 'list number')` → `an id, alias or list number`."""
    if not ways:
        return "anything"
    words = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
