"""Small helpers for building profile variants in tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.profile import BUILTIN_PROFILES_DIR, SandboxProfile, validate_document
from controller.profile.source import parse_document

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


def goose_variant(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> SandboxProfile:
    """The reference profile with one edit to its `spec`, validated like a file on disk."""
    data = yaml.safe_load((BUILTIN_PROFILES_DIR / "goose.yaml").read_text(encoding="utf-8"))
    if edit is not None:
        edit(data["spec"])
    report = validate_document(parse_document(yaml.safe_dump(data, sort_keys=False), tmp_path / "goose.yaml"))
    assert report.valid, [str(finding) for finding in report.errors]
    assert report.profile is not None
    return report.profile
