"""Each field check, table-driven: a change to the goose profile and the error it must produce."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ValidateText
from tests.helpers import DELETE, set_path

# (field, bad value, path reported, words the message must contain)
INVALID: list[tuple[str, Any, str, str]] = [
    ("spec.lifecycle.ttl", "4 hours", "spec.lifecycle.ttl", "not a duration"),
    ("spec.lifecycle.ttl", 4, "spec.lifecycle.ttl", "must be a valid string (got 4); quote it"),
    ("spec.lifecycle.idleTimeout", "0", "spec.lifecycle.idleTimeout", "only allowed for lifecycle.ttl"),
    ("spec.lifecycle.teardownPolicy", "delete", "spec.lifecycle.teardownPolicy", "'destroy', 'stop' or 'retain' (got 'delete')"),
    ("spec.runtime.substrate", "docker", "spec.runtime.substrate", "'ec2' or 'local'"),
    ("spec.runtime.spot", "no", "spec.runtime.spot", "valid boolean"),
    ("spec.runtime.instanceType", "medium", "spec.runtime.instanceType", "not an EC2 instance type"),
    ("spec.runtime.region", "us-east", "spec.runtime.region", "not an AWS region"),
    ("spec.runtime.region", "US-EAST-1", "spec.runtime.region", "not an AWS region"),
    ("spec.runtime.rootVolumeSize", -1, "spec.runtime.rootVolumeSize", "greater than or equal to 0"),
    ("spec.runtime.rootVolumeSize", "15", "spec.runtime.rootVolumeSize", "valid integer"),
    ("spec.runtime.ami", "centos-7", "spec.runtime.ami", "amazon-linux-2023"),
    ("spec.runtime.ami", "ami-XYZ", "spec.runtime.ami", "ami-0123456789abcdef0"),
    ("spec.runtime.efsMountPoint", "shared", "spec.runtime.efsMountPoint", "absolute path"),
    ("spec.runtime.additionalVolume.mountPoint", "data", "spec.runtime.additionalVolume.mountPoint", "absolute path"),
    ("spec.runtime.additionalVolume.mountPoint", "/data/../etc", "spec.runtime.additionalVolume.mountPoint", "write '/etc'"),
    ("spec.runtime.additionalVolume.size", 0, "spec.runtime.additionalVolume.size", "greater than or equal to 1"),
    ("spec.execution.workingDir", "workspace", "spec.execution.workingDir", "absolute path"),
    ("spec.execution.env", {"1BAD": "x"}, "spec.execution.env.1BAD", "not a valid environment variable name"),
    ("spec.execution.env", {"BAD-NAME": "x"}, "spec.execution.env.BAD-NAME", "not a valid environment variable name"),
    ("spec.execution.env", {"GOOD": 1}, "spec.execution.env.GOOD", "quote it"),
    ("spec.execution.configFiles", {"relative/file": "x"}, 'spec.execution.configFiles["relative/file"]', "absolute path"),
    ("spec.execution.initCommands", "echo hi", "spec.execution.initCommands", "valid list"),
    ("spec.budget.compute.maxSpendUSD", -0.5, "spec.budget.compute.maxSpendUSD", "greater than or equal to 0"),
    ("spec.budget.ai.maxSpendUSD", -1, "spec.budget.ai.maxSpendUSD", "greater than or equal to 0"),
    ("spec.network.enforcement", "iptables", "spec.network.enforcement", "'ebpf', 'proxy' or 'both'"),
    (
        "spec.network.egress.allowedDNSSuffixes",
        ["*.github.com"],
        "spec.network.egress.allowedDNSSuffixes[0]",
        "write 'github.com'",
    ),
    (
        "spec.network.egress.allowedDNSSuffixes",
        ["bad_name.com"],
        "spec.network.egress.allowedDNSSuffixes[0]",
        "not a valid DNS suffix",
    ),
    (
        "spec.network.egress.allowedDNSSuffixes",
        ["-bad.com"],
        "spec.network.egress.allowedDNSSuffixes[0]",
        "not a valid DNS suffix",
    ),
    ("spec.network.egress.allowedHosts", ["https://api.github.com"], "spec.network.egress.allowedHosts[0]", "without scheme"),
    ("spec.network.egress.allowedHosts", ["*.github.com"], "spec.network.egress.allowedHosts[0]", "allowedDNSSuffixes"),
    ("spec.network.egress.allowedCIDRs", ["10.0.0.1/8"], "spec.network.egress.allowedCIDRs[0]", "write '10.0.0.0/8'"),
    ("spec.network.egress.allowedCIDRs", ["10.0.0.0/33"], "spec.network.egress.allowedCIDRs[0]", "not a CIDR block"),
    ("spec.sourceAccess.mode", "open", "spec.sourceAccess.mode", "'allowlist' or 'none'"),
    ("spec.sourceAccess.github.allowedRepos", ["my-org"], "spec.sourceAccess.github.allowedRepos[0]", "owner/repo, owner/* or *"),
    ("spec.sourceAccess.github.allowedRepos", ["my-org/api/x"], "spec.sourceAccess.github.allowedRepos[0]", "owner/repo"),
    ("spec.sourceAccess.github.allowedRepos", ["*/api"], "spec.sourceAccess.github.allowedRepos[0]", "owner/repo"),
    ("spec.sourceAccess.github.allowedRefs", ["feature/[abc"], "spec.sourceAccess.github.allowedRefs[0]", "unbalanced"),
    ("spec.sourceAccess.github.allowedRefs", ["a..b"], "spec.sourceAccess.github.allowedRefs[0]", "'..'"),
    ("spec.sourceAccess.github.allowedRefs", ["has space"], "spec.sourceAccess.github.allowedRefs[0]", "spaces"),
    ("spec.sourceAccess.github.allowedRefs", ["feature/"], "spec.sourceAccess.github.allowedRefs[0]", "slashes"),
    ("spec.sourceAccess.github.allowedRefs", ["x.lock"], "spec.sourceAccess.github.allowedRefs[0]", ".lock"),
    ("spec.sourceAccess.github.allowedRefs", [""], "spec.sourceAccess.github.allowedRefs[0]", "empty"),
    ("spec.identity.allowedRegions", [], "spec.identity.allowedRegions", "at least 1 item"),
    ("spec.identity.allowedRegions", ["mars-1"], "spec.identity.allowedRegions[0]", "not an AWS region"),
    ("spec.identity.roleSessionDuration", "1 hour", "spec.identity.roleSessionDuration", "not a duration"),
    ("spec.identity.sessionPolicy", "admin", "spec.identity.sessionPolicy", "'minimal'"),
    ("spec.identity.allowedSecretPaths", ["no-slash"], "spec.identity.allowedSecretPaths[0]", "SSM parameter path"),
    ("spec.observability.tlsCapture.libraries", ["boringssl"], "spec.observability.tlsCapture.libraries[0]", "'openssl'"),
    ("spec.email.signing", "maybe", "spec.email.signing", "'required', 'optional' or 'off'"),
    ("spec.cli.notifySlackChannelOverride", "general", "spec.cli.notifySlackChannelOverride", "should match pattern"),
    ("metadata.name", "Goose", "metadata.name", "lower-case"),
    ("metadata.prefix", "1abc", "metadata.prefix", "lower-case letter"),
    ("metadata.prefix", "waytoolongprefix", "metadata.prefix", "up to 11"),
    ("apiVersion", "klankermaker.ai/v1alpha2", "apiVersion", "'klankermaker.ai/v1alpha1'"),
    ("kind", "Profile", "kind", "'SandboxProfile'"),
    ("spec.lifecycle.ttl", DELETE, "spec.lifecycle.ttl", "required field is missing"),
    ("spec.runtime", DELETE, "spec.runtime", "required field is missing"),
]


@pytest.mark.parametrize(("field", "value", "path", "words"), INVALID, ids=[f"{f}={v!r}"[:60] for f, v, *_ in INVALID])
def test_invalid_field_is_reported_at_its_path(
    goose_data: dict[str, Any], validate_text: ValidateText, field: str, value: Any, path: str, words: str
) -> None:
    report = validate_text(set_path(goose_data, field, value))
    assert not report.valid
    matching = [f for f in report.errors if f.dotted_path == path]
    assert matching, f"no error at {path}; got {[str(f) for f in report.errors]}"
    assert any(words in f.message for f in matching), [f.message for f in matching]


VALID: list[tuple[str, Any]] = [
    ("spec.lifecycle.ttl", "0"),
    ("spec.lifecycle.ttl", "7d"),
    ("spec.lifecycle.ttl", "1d4h30m"),
    ("spec.runtime.substrate", "local"),
    ("spec.runtime.ami", "ami-0123456789abcdef0"),
    ("spec.runtime.ami", "debian-12"),
    ("spec.network.egress.allowedDNSSuffixes", ["github.com", ".GitHub.com", "*", ".bücher.example", "example.com."]),
    ("spec.network.egress.allowedCIDRs", ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]),
    ("spec.sourceAccess.github.allowedRepos", ["owner/repo", "owner/*", "*", "my-org-x/re_po.js"]),
    ("spec.sourceAccess.github.allowedRefs", ["main", "release/v[0-9]*", "fix/?-*", "refs/heads/*"]),
    ("spec.runtime.region", "us-gov-west-1"),
    ("spec.budget.ai.maxSpendUSD", 0),
    ("metadata.labels", {"team": "platform", "km.io/owner": "ops"}),
]


@pytest.mark.parametrize(("field", "value"), VALID, ids=[f"{f}={v!r}"[:60] for f, v in VALID])
def test_valid_values_are_accepted(goose_data: dict[str, Any], validate_text: ValidateText, field: str, value: Any) -> None:
    set_path(goose_data, "spec.identity.allowedRegions", ["us-east-1", "us-gov-west-1"])
    report = validate_text(set_path(goose_data, field, value))
    assert report.valid, [str(f) for f in report.errors]


def test_unknown_fields_are_errors_with_a_suggestion(goose_data: dict[str, Any], validate_text: ValidateText) -> None:
    goose_data["spec"]["runtime"]["instancetype"] = "t3.small"
    goose_data["spec"]["network"]["egress"]["allowedDnsSuffixes"] = [".x.com"]
    goose_data["spec"]["lifecycle"]["ttlx"] = "1h"
    goose_data["spec"]["zzz"] = 1
    messages = {f.dotted_path: f.message for f in validate_text(goose_data).errors}
    assert messages["spec.runtime.instancetype"] == "unknown field 'instancetype'; did you mean 'instanceType'?"
    assert messages["spec.network.egress.allowedDnsSuffixes"].endswith("did you mean 'allowedDNSSuffixes'?")
    assert messages["spec.lifecycle.ttlx"].endswith("did you mean 'ttl'?")
    assert messages["spec.zzz"].startswith("unknown field 'zzz'; fields here: artifacts, budget, cli")


def test_error_lines_point_at_the_offending_line(validate_text: ValidateText, goose_data: dict[str, Any]) -> None:
    from controller.profile import BUILTIN_PROFILES_DIR

    goose = (BUILTIN_PROFILES_DIR / "goose.yaml").read_text()
    text = goose.replace("spot: false", "spot: true").replace("teardownPolicy: stop", "teardownPolicy: destroy")
    report = validate_text(text, name="x.yaml")
    (finding,) = report.errors
    line = text.splitlines().index("    spot: true") + 1
    assert (
        str(finding)
        == f"{report.file}:{line}: spec.runtime.spot: hibernation requires spot: false (hibernation is on-demand only)"
    )
