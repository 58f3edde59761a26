"""The profiles km ships are valid, named after their files, and goose is the product brief's, verbatim."""

from __future__ import annotations

import hashlib

import pytest

from controller.profile import BUILTIN_PROFILES_DIR, load_profile, validate
from controller.profile.catalog import builtin_profiles

ENTRIES = builtin_profiles()
# sha256 of the goose profile exactly as the product brief gives it; any edit to the file is a mistake.
GOOSE_SHA256 = "c697128318b97c5e3ac943e8853a6c0c0d18443c7b4d02c7592f7dfa178caafb"


def test_ships_the_expected_profiles_and_fragments() -> None:
    names = {entry.name for entry in ENTRIES if not entry.abstract}
    assert names >= {"goose", "open-dev", "restricted-dev", "hardened", "sealed", "claude", "codex"}
    assert all(entry.name.startswith("base/") for entry in ENTRIES if entry.abstract)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if not e.abstract], ids=lambda e: e.name)
def test_builtin_profile_is_valid_without_warnings_and_named_after_its_file(entry) -> None:  # type: ignore[no-untyped-def]
    report = validate(entry.name)
    assert report.findings == [], [str(f) for f in report.findings]
    profile, merged = load_profile(entry.name)
    assert profile.metadata.name == entry.name
    assert merged.file == entry.file.resolve()


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.abstract], ids=lambda e: e.name)
def test_fragment_is_structurally_valid(entry) -> None:  # type: ignore[no-untyped-def]
    report = validate(entry.name)
    assert report.valid and report.abstract, [str(f) for f in report.errors]


def test_every_fragment_is_used_by_some_profile() -> None:
    used = {file for entry in ENTRIES if not entry.abstract for file in load_profile(entry.name)[1].files}
    unused = [entry.name for entry in ENTRIES if entry.abstract and entry.file.resolve() not in used]
    assert unused == []


def test_goose_is_verbatim() -> None:
    assert hashlib.sha256((BUILTIN_PROFILES_DIR / "goose.yaml").read_bytes()).hexdigest() == GOOSE_SHA256


def test_sealed_really_has_no_egress() -> None:
    profile, _ = load_profile("sealed")
    egress = profile.spec.network.egress
    assert (egress.allowed_dns_suffixes, egress.allowed_hosts, egress.allowed_cidrs) == ([], [], [])
