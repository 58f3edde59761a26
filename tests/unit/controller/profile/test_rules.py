"""Semantic rules, one table row per rule (and per edge of it)."""

from __future__ import annotations

from typing import Any

import pytest

from controller.profile import SandboxProfile
from controller.profile.rules import RULES, ebpf_enforcement_needs_capable_substrate
from tests.conftest import ValidateText
from tests.helpers import set_path

# (changes to goose, path of the error, words in its message)
BROKEN: list[tuple[dict[str, Any], str, str]] = [
    ({"spec.lifecycle.ttl": "30m"}, "spec.lifecycle.ttl", "shorter than idleTimeout 1h"),
    ({"spec.lifecycle.ttl": "1d", "spec.lifecycle.idleTimeout": "2d"}, "spec.lifecycle.ttl", "shorter than idleTimeout 2d"),
    (
        {"spec.runtime.spot": True, "spec.lifecycle.teardownPolicy": "destroy"},
        "spec.runtime.spot",
        "hibernation requires spot: false (hibernation is on-demand only)",
    ),
    (
        {"spec.runtime.spot": True, "spec.runtime.hibernation": False},
        "spec.lifecycle.teardownPolicy",
        "a spot instance cannot be stopped: set teardownPolicy: destroy (or retain), or spot: false",
    ),
    ({"spec.runtime.rootVolumeSize": 4}, "spec.runtime.rootVolumeSize", "t3.medium has 4 GiB of memory"),
    ({"spec.runtime.rootVolumeSize": 0}, "spec.runtime.rootVolumeSize", "it is the image default"),
    ({"spec.runtime.instanceType": "m5.2xlarge", "spec.runtime.rootVolumeSize": 30}, "spec.runtime.rootVolumeSize", "32 GiB"),
    ({"spec.budget.warningThreshold": 0}, "spec.budget.warningThreshold", "in (0, 1]"),
    ({"spec.budget.warningThreshold": 1.5}, "spec.budget.warningThreshold", "in (0, 1]"),
    ({"spec.budget.warningThreshold": -0.1}, "spec.budget.warningThreshold", "in (0, 1]"),
    ({"spec.runtime.region": "eu-west-1"}, "spec.runtime.region", "not in identity.allowedRegions (us-east-1)"),
    ({"spec.runtime.additionalVolume.mountPoint": "/etc"}, "spec.runtime.additionalVolume.mountPoint", "a system path"),
    ({"spec.runtime.additionalVolume.mountPoint": "/"}, "spec.runtime.additionalVolume.mountPoint", "a system path"),
    ({"spec.runtime.additionalVolume.mountPoint": "/proc"}, "spec.runtime.additionalVolume.mountPoint", "a system path"),
    ({"spec.runtime.additionalVolume.mountPoint": "/tmp"}, "spec.runtime.additionalVolume.mountPoint", "a system path"),
    (
        {"spec.runtime.additionalVolume.mountPoint": "/workspace"},
        "spec.runtime.additionalVolume.mountPoint",
        "execution.workingDir",
    ),
    (
        {"spec.runtime.additionalVolume.mountPoint": "/shared"},
        "spec.runtime.additionalVolume.mountPoint",
        "runtime.efsMountPoint",
    ),
    ({"spec.runtime.efsMountPoint": "/usr"}, "spec.runtime.efsMountPoint", "system path"),
    ({"spec.runtime.efsMountPoint": "/workspace"}, "spec.runtime.efsMountPoint", "workingDir"),
    ({"spec.identity.roleSessionDuration": "30m"}, "spec.identity.roleSessionDuration", "1h to 12h"),
    ({"spec.identity.roleSessionDuration": "1d"}, "spec.identity.roleSessionDuration", "1h to 12h"),
    ({"spec.cli.notifySlackChannelOverride": "C0123ABC"}, "spec.cli.notifySlackChannelOverride", "exclude each other"),
    (
        {"spec.cli.notifySlackPerSandbox": False, "spec.cli.notifySlackTranscriptEnabled": False},
        "spec.cli.notifySlackInboundEnabled",
        "notifySlackPerSandbox: true",
    ),
    (
        {"spec.cli.notifySlackEnabled": False, "spec.cli.notifySlackInboundEnabled": False},
        "spec.cli.notifySlackTranscriptEnabled",
        "notifySlackEnabled: true",
    ),
]

FINE: list[dict[str, Any]] = [
    {"spec.lifecycle.ttl": "0"},
    {"spec.lifecycle.ttl": "1h"},
    {"spec.lifecycle.ttl": "7d", "spec.lifecycle.idleTimeout": "1d"},
    {
        "spec.runtime.hibernation": False,
        "spec.runtime.spot": True,
        "spec.runtime.rootVolumeSize": 0,
        "spec.lifecycle.teardownPolicy": "destroy",
    },
    {"spec.runtime.hibernation": False, "spec.runtime.spot": True, "spec.lifecycle.teardownPolicy": "retain"},
    {"spec.runtime.instanceType": "x9.unknown", "spec.runtime.rootVolumeSize": 1},
    {"spec.budget.warningThreshold": 1},
    {"spec.runtime.additionalVolume.mountPoint": "/data/extra"},
    {"spec.runtime.mountEFS": False, "spec.runtime.additionalVolume.mountPoint": "/shared"},
    {"spec.identity.roleSessionDuration": "12h"},
    {"spec.runtime.substrate": "local"},
]


def _apply(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for field, value in changes.items():
        set_path(data, field, value)
    return data


@pytest.mark.parametrize(("changes", "path", "words"), BROKEN, ids=[str(c) for c, *_ in BROKEN])
def test_rule_reports_at_the_field_to_change(
    goose_data: dict[str, Any], validate_text: ValidateText, changes: dict[str, Any], path: str, words: str
) -> None:
    report = validate_text(_apply(goose_data, changes))
    assert [(f.dotted_path, words in f.message) for f in report.errors] == [(path, True)], [str(f) for f in report.errors]


@pytest.mark.parametrize("changes", FINE, ids=[str(c) for c in FINE])
def test_rule_edges_that_are_fine(goose_data: dict[str, Any], validate_text: ValidateText, changes: dict[str, Any]) -> None:
    report = validate_text(_apply(goose_data, changes))
    assert report.valid, [str(f) for f in report.errors]


def test_ebpf_enforcement_needs_an_ebpf_capable_substrate(goose_data: dict[str, Any], validate_text: ValidateText) -> None:
    # The schema admits only ec2 and local today, both eBPF-capable; the rule guards substrates added later.
    profile = validate_text(goose_data).profile
    assert profile is not None
    runtime = profile.spec.runtime.model_copy(update={"substrate": "fargate"})
    elsewhere = profile.model_copy(update={"spec": profile.spec.model_copy(update={"runtime": runtime})})
    assert isinstance(elsewhere, SandboxProfile)
    (finding,) = ebpf_enforcement_needs_capable_substrate(elsewhere)
    assert finding.path == ("spec", "network", "enforcement")
    assert "use enforcement: proxy" in finding.message
    assert list(ebpf_enforcement_needs_capable_substrate(profile)) == []


def test_every_rule_is_exercised_by_the_table() -> None:
    exercised = {"ebpf_enforcement_needs_capable_substrate"}
    by_path = {
        "spec.lifecycle.ttl": "ttl_covers_idle_timeout",
        "spec.runtime.spot": "hibernation_needs_on_demand",
        "spec.lifecycle.teardownPolicy": "spot_is_not_stopped",
        "spec.runtime.rootVolumeSize": "hibernation_root_volume_holds_memory",
        "spec.budget.warningThreshold": "warning_threshold_is_a_fraction",
        "spec.runtime.region": "region_is_allowed",
        "spec.identity.roleSessionDuration": "role_session_duration_in_iam_bounds",
        "spec.runtime.additionalVolume.mountPoint": "volume_mount_points_are_free",
        "spec.cli.notifySlackChannelOverride": "slack_settings_are_consistent",
    }
    exercised |= {by_path[path] for _, path, _ in BROKEN if path in by_path}
    assert exercised == {rule.__name__ for rule in RULES}


def test_warnings_do_not_make_a_profile_invalid(goose_data: dict[str, Any], validate_text: ValidateText) -> None:
    set_path(goose_data, "spec.network.egress.allowedDNSSuffixes", ["*"])
    set_path(goose_data, "spec.observability.tlsCapture.libraries", ["openssl", "gnutls"])
    report = validate_text(goose_data)
    assert report.valid
    warnings = {f.dotted_path: f.message for f in report.warnings}
    assert "egress by name is open" in warnings["spec.network.egress.allowedDNSSuffixes"]
    assert "gnutls capture is not supported yet" in warnings["spec.observability.tlsCapture.libraries[1]"]


def test_capture_without_openssl_is_refused(goose_data: dict[str, Any], validate_text: ValidateText) -> None:
    set_path(goose_data, "spec.observability.tlsCapture", {"enabled": True, "libraries": ["go", "rustls"]})
    report = validate_text(goose_data)
    assert not report.valid
    errors = {f.dotted_path: f.message for f in report.errors}
    assert "openssl is required" in errors["spec.observability.tlsCapture.libraries"]
    warnings = {f.dotted_path: f.message for f in report.warnings}
    assert "go capture is not supported yet" in warnings["spec.observability.tlsCapture.libraries[0]"]


def test_payloads_beyond_what_the_kernel_copies_are_refused(goose_data: dict[str, Any], validate_text: ValidateText) -> None:
    set_path(goose_data, "spec.observability.tlsCapture", {"enabled": True, "capturePayloads": True, "maxPayloadBytes": 8192})
    report = validate_text(goose_data)
    assert not report.valid
    assert [f.dotted_path for f in report.errors] == ["spec.observability.tlsCapture.maxPayloadBytes"]
