"""Findings and the error type that carries them to the operator.

Every problem km reports about a profile names the file, the line, the field path and the fix, so an
operator can act on it without reading km's source. A `Finding` is one such problem; `ProfileError`
carries one or more of them out of the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]
FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Location:
    """Where a value was written: the file and 1-based line of the layer that set it."""

    file: Path | None
    line: int | None

    def __str__(self) -> str:
        if self.file is None:
            return "<profile>"
        shown = display_path(self.file)
        return f"{shown}:{self.line}" if self.line else shown


@dataclass(frozen=True)
class Finding:
    """One problem with a profile, at a field path, with the operator's fix in the message."""

    path: FieldPath
    message: str
    location: Location = field(default_factory=lambda: Location(None, None))
    severity: Severity = "error"

    @property
    def dotted_path(self) -> str:
        return dotted(self.path)

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location.file is not None else ""
        path = f"{self.dotted_path}: " if self.path else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}{prefix}{path}{self.message}"

    def as_json(self) -> dict[str, object]:
        return {
            "path": self.dotted_path,
            "file": str(self.location.file) if self.location.file else None,
            "line": self.location.line,
            "message": self.message,
        }


class ProfileError(Exception):
    """A profile could not be loaded, merged or validated; `findings` says exactly why."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


def dotted(path: FieldPath) -> str:
    """`('spec', 'network', 'egress', 'allowedHosts', 2)` → `spec.network.egress.allowedHosts[2]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text and ("." in part or "/" in part or " " in part):
            text += f'["{part}"]'
        else:
            text += f".{part}" if text else part
    return text


def display_path(file: Path) -> str:
    """Paths under the working directory are shown relative, as operators typed them."""
    try:
        return str(file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file)
