"""Sandbox profiles: the schema, inheritance through `extends`, and validation with located errors."""

from controller.profile.durations import DurationError, format_duration, parse_duration
from controller.profile.errors import Finding, Location, ProfileError
from controller.profile.extends import BUILTIN_PROFILES_DIR, MergedDocument, ProfileResolver
from controller.profile.schema import API_VERSION, KIND, SandboxProfile
from controller.profile.validate import ValidationReport, load_profile, validate, validate_document

__all__ = [
    "API_VERSION",
    "BUILTIN_PROFILES_DIR",
    "DurationError",
    "Finding",
    "KIND",
    "Location",
    "MergedDocument",
    "ProfileError",
    "ProfileResolver",
    "SandboxProfile",
    "ValidationReport",
    "format_duration",
    "load_profile",
    "parse_duration",
    "validate",
    "validate_document",
]
