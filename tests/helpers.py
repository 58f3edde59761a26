"""Small helpers for building profile variants in tests."""

from __future__ import annotations

from typing import Any

DELETE = object()


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set `a.b.c` in nested dicts (creating maps); `value=DELETE` removes the key."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data
