"""Load, merge and validate a profile, turning every problem into located, actionable findings.

Validation never raises for a bad profile: it returns a report whose findings carry file, line, field
path and fix. `load_profile` is the strict door for callers that need a usable profile (compile,
create) and raises `ProfileError` instead.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from controller.profile.errors import FieldPath, Finding, Location, ProfileError
from controller.profile.extends import MergedDocument, ProfileResolver
from controller.profile.rules import check_rules, warnings_for
from controller.profile.schema import SandboxProfile
from controller.profile.source import SourceDocument


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of validating one profile reference."""

    reference: str
    file: Path | None
    merged: MergedDocument | None
    profile: SandboxProfile | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def abstract(self) -> bool:
        return self.merged is not None and self.merged.abstract

    def as_json(self) -> dict[str, object]:
        return {
            "file": str(self.file) if self.file else self.reference,
            "valid": self.valid,
            "abstract": self.abstract,
            "errors": [f.as_json() for f in self.errors],
            "warnings": [f.as_json() for f in self.warnings],
        }


def validate(reference: str | Path, resolver: ProfileResolver | None = None) -> ValidationReport:
    """Validate a profile given by file path or name; problems are findings, never exceptions."""
    resolver = resolver or ProfileResolver()
    reference = str(reference)
    try:
        merged = resolver.load(reference)
    except ProfileError as exc:
        return ValidationReport(reference, resolver.find(reference), None, None, list(exc.findings))
    return _validate_merged(reference, merged)


def validate_document(document: SourceDocument, resolver: ProfileResolver | None = None) -> ValidationReport:
    """Validate an already-parsed document (its `extends` still resolve against the resolver's paths)."""
    resolver = resolver or ProfileResolver()
    try:
        merged = resolver.merge_document(document)
    except ProfileError as exc:
        return ValidationReport(str(document.file), document.file, None, None, list(exc.findings))
    return _validate_merged(str(document.file), merged)


def load_profile(reference: str | Path, resolver: ProfileResolver | None = None) -> tuple[SandboxProfile, MergedDocument]:
    """A valid, creatable profile and where it came from, or `ProfileError` with every finding."""
    report = validate(reference, resolver)
    if not report.valid:
        raise ProfileError(report.errors)
    if report.profile is None or report.merged is None:
        path: FieldPath = ("metadata", "abstract")
        message = "this is an abstract fragment: extend it from a profile instead of using it directly"
        raise ProfileError([Finding(path, message, report.merged.location(path) if report.merged else Location(None, None))])
    return report.profile, report.merged


def _validate_merged(reference: str, merged: MergedDocument) -> ValidationReport:
    try:
        profile = SandboxProfile.model_validate(merged.data)
    except ValidationError as exc:
        raw_errors = exc.errors(include_url=False)
        if merged.abstract:
            # A fragment is checked for what it says, not for what it leaves to the profiles extending it.
            raw_errors = [error for error in raw_errors if error["type"] != "missing"]
        errors = [_finding_from_pydantic(error, merged) for error in raw_errors]
        return ValidationReport(reference, merged.file, merged, None, errors)
    if merged.abstract:
        return ValidationReport(reference, merged.file, merged, None, [])
    findings = check_rules(profile) + warnings_for(profile)
    located = [Finding(f.path, f.message, merged.location(f.path), f.severity) for f in findings]
    return ValidationReport(reference, merged.file, merged, profile, located)


def _finding_from_pydantic(error: Any, merged: MergedDocument) -> Finding:
    path: FieldPath = tuple(part for part in error["loc"] if part != "[key]")
    kind = error["type"]
    if kind == "extra_forbidden":
        message = _unknown_field_message(path)
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "km_value":
        message = error["msg"]
    else:
        message = _rephrase(error["msg"], error.get("input"))
    if error["loc"] and error["loc"][-1] == "[key]" and kind != "km_value":
        message = f"key {path[-1]!r}: {message}"
    return Finding(path, message, merged.location(path))


def _rephrase(message: str, given: object) -> str:
    text = message.replace("Input should be", "must be", 1)
    if text.startswith("Value error, "):
        text = text[len("Value error, ") :]
    if "valid string" in text and isinstance(given, (int, float, bool)):
        return f"{text} (got {given!r}); quote it in YAML"
    if isinstance(given, (str, int, float, bool)) or given is None:
        return f"{text} (got {given!r})"
    return f"{text} (got a {type(given).__name__})"


def _unknown_field_message(path: FieldPath) -> str:
    unknown = str(path[-1])
    allowed = _allowed_fields(path[:-1])
    message = f"unknown field {unknown!r}"
    close = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
    if not close:
        lowered = {name.lower(): name for name in allowed}
        close = [lowered[unknown.lower()]] if unknown.lower() in lowered else []
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    if allowed:
        return f"{message}; fields here: {', '.join(sorted(allowed))}"
    return message


def _allowed_fields(path: FieldPath) -> list[str]:
    """The YAML names of the model reached by walking `path` from the profile root."""
    model: type[BaseModel] | None = SandboxProfile
    for part in path:
        if model is None or isinstance(part, int):
            continue
        next_model = None
        for name, info in model.model_fields.items():
            if part in (info.alias, name):
                next_model = _model_in(info.annotation)
                break
        model = next_model
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
