"""host-agent.json and sandbox.env: the contract the sandbox daemon reads, on its own side of the line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from host_agent.config import (
    CONFIG_PATH,
    SANDBOX_ENV_PATH,
    SCHEMA_VERSION,
    EgressPolicy,
    ExecutionPolicy,
    HostAgentConfig,
    LifecyclePolicy,
    SandboxIdentity,
    load_config,
    load_identity,
)

REPO = Path(__file__).resolve().parents[3]


def minimal_document() -> dict[str, Any]:
    return {
        "profile": "tiny",
        "substrate": "local",
        "region": "eu-west-1",
        "lifecycle": {"ttl_seconds": 0, "idle_timeout_seconds": 60, "teardown_policy": "destroy"},
        "execution": {"working_dir": "/workspace", "shell": "/bin/bash"},
        "egress": {"enforcement": "ebpf", "mode": "enforce"},
    }


def full_config() -> HostAgentConfig:
    return HostAgentConfig.model_validate(
        {
            **minimal_document(),
            "execution": {
                "working_dir": "/workspace",
                "shell": "/bin/bash",
                "env": {"QUOTED": 'a\'b "c" $HOME', "UNICODE": "ünï ✓"},
                "bedrock_env": {"CLAUDE_CODE_USE_BEDROCK": "1"},
                "default_agent": "goose",
                "agent_args": {"goose": ["--debug"]},
                "no_bedrock_default": True,
            },
            "egress": {
                "enforcement": "both",
                "mode": "log",
                "allowed_dns_suffixes": ["github.com", "*"],
                "allowed_hosts": ["api.openai.com"],
                "allowed_cidrs": ["10.0.0.0/8", "2001:db8::/32"],
            },
            "budget": {"compute_max_usd": 0.5, "ai_max_usd": 1.25, "warning_threshold": 0.9},
            "source_access": {"mode": "allowlist", "allowed_repos": ["my-org/*"], "allowed_refs": ["feature/*"]},
            "artifacts": {"paths": ["/workspace/out"], "max_size_mb": 100},
            "observability": {"tls_capture": {"enabled": True, "capture_payloads": True, "max_payload_bytes": 512}},
        }
    )


def test_paths_are_where_the_boot_script_puts_them() -> None:
    assert CONFIG_PATH == Path("/etc/km/host-agent.json")
    assert SANDBOX_ENV_PATH == Path("/etc/km/sandbox.env")


def test_defaults_of_a_minimal_config() -> None:
    config = HostAgentConfig.model_validate(minimal_document())
    assert config.schema_version == SCHEMA_VERSION == 1
    assert config.execution.bedrock_env == {} and config.execution.default_agent == "claude"
    assert (config.budget.compute_max_usd, config.budget.ai_max_usd, config.budget.warning_threshold) == (None, None, 0.8)
    assert config.source_access.mode == "none"
    assert config.observability.tls_capture.libraries == ["openssl"]
    assert config.egress.allowed_dns_suffixes == []


@pytest.mark.parametrize("config", [HostAgentConfig.model_validate(minimal_document()), full_config()], ids=["minimal", "full"])
def test_round_trip_and_stable_bytes(config: HostAgentConfig, tmp_path: Path) -> None:
    text = config.to_json()
    assert HostAgentConfig.model_validate_json(text) == config
    assert HostAgentConfig.model_validate_json(text).to_json() == text
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    path = tmp_path / "host-agent.json"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == config


def test_to_json_does_not_depend_on_field_order() -> None:
    document = minimal_document()
    reordered = dict(reversed(list(document.items())))
    reordered["lifecycle"] = dict(reversed(list(document["lifecycle"].items())))
    assert HostAgentConfig.model_validate(reordered).to_json() == HostAgentConfig.model_validate(document).to_json()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(unknown_field=1), "unknown_field"),
        (lambda d: d["egress"].update(allowed_domains=["x"]), "allowed_domains"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(substrate="docker"), "substrate"),
        (lambda d: d["lifecycle"].update(ttl_seconds=-1), "ttl_seconds"),
        (lambda d: d["lifecycle"].update(idle_timeout_seconds=0), "idle_timeout_seconds"),
        (lambda d: d["lifecycle"].update(teardown_policy="explode"), "teardown_policy"),
        (lambda d: d["egress"].update(mode="audit"), "mode"),
        (lambda d: d["egress"].update(enforcement="iptables"), "enforcement"),
        (lambda d: d.update(budget={"warning_threshold": 0}), "warning_threshold"),
        (lambda d: d.update(budget={"warning_threshold": 1.5}), "warning_threshold"),
        (lambda d: d.update(budget={"compute_max_usd": -1}), "compute_max_usd"),
        (lambda d: d["execution"].update(default_agent="aider"), "default_agent"),
        (lambda d: d.pop("egress"), "egress"),
    ],
)
def test_the_contract_rejects_what_the_daemon_cannot_enforce(change: Any, field: str, tmp_path: Path) -> None:
    document = minimal_document()
    change(document)
    with pytest.raises(ValidationError) as raised:
        HostAgentConfig.model_validate(document)
    assert field in str(raised.value)
    path = tmp_path / "host-agent.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValidationError):
        load_config(path)


def test_config_is_frozen() -> None:
    config = HostAgentConfig.model_validate(minimal_document())
    with pytest.raises(ValidationError):
        config.profile = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.egress.mode = "log"  # type: ignore[misc]


def test_load_config_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.json")


def test_load_config_of_broken_json_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "host-agent.json"
    path.write_text('{"profile": ', encoding="utf-8")
    with pytest.raises(ValidationError):
        load_config(path)


def test_policy_models_are_usable_on_their_own() -> None:
    lifecycle = LifecyclePolicy(ttl_seconds=604_800, idle_timeout_seconds=3_600, teardown_policy="retain")
    execution = ExecutionPolicy(working_dir="/w", shell="/bin/sh")
    egress = EgressPolicy(enforcement="proxy", mode="log")
    assert (lifecycle.ttl_seconds, execution.env, egress.allowed_hosts) == (604_800, {}, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "KM_SANDBOX_ID=gebpfgk-0a1b2c3d\n",
            {
                "sandbox_id": "gebpfgk-0a1b2c3d",
                "alias": None,
                "artifacts_uri": None,
                "resource_prefix": "km",
                "dns_upstream": None,
            },
        ),
        (
            "# written by km create\n\nKM_SANDBOX_ID=gebpfgk-0a1b2c3d\nKM_ALIAS=goose\n"
            "KM_ARTIFACTS_URI=s3://km-artifacts-123/prefix\nKM_RESOURCE_PREFIX=kmtest\nKM_EFS_ID=fs-0123\n"
            "KM_DNS_UPSTREAM=198.19.0.2:53\n",
            {
                "sandbox_id": "gebpfgk-0a1b2c3d",
                "alias": "goose",
                "artifacts_uri": "s3://km-artifacts-123/prefix",
                "resource_prefix": "kmtest",
                "dns_upstream": "198.19.0.2:53",
            },
        ),
        (
            "KM_SANDBOX_ID='sb-deadbeef'\nKM_ALIAS=\"my-goose\"\n  KM_ARTIFACTS_URI=/var/lib/km/artifacts\nnot a pair\n",
            {
                "sandbox_id": "sb-deadbeef",
                "alias": "my-goose",
                "artifacts_uri": "/var/lib/km/artifacts",
                "resource_prefix": "km",
                "dns_upstream": None,
            },
        ),
        (
            "KM_SANDBOX_ID=sb-1\nKM_SANDBOX_ID=sb-2\n",
            {"sandbox_id": "sb-2", "alias": None, "artifacts_uri": None, "resource_prefix": "km", "dns_upstream": None},
        ),
        (
            "KM_SANDBOX_ID=sb-1=x\n",
            {"sandbox_id": "sb-1=x", "alias": None, "artifacts_uri": None, "resource_prefix": "km", "dns_upstream": None},
        ),
    ],
    ids=["id-only", "all-fields", "quotes-and-indent", "last-wins", "equals-in-value"],
)
def test_load_identity(tmp_path: Path, text: str, expected: dict[str, Any]) -> None:
    path = tmp_path / "sandbox.env"
    path.write_text(text, encoding="utf-8")
    assert load_identity(path).model_dump() == expected


def test_identity_needs_a_sandbox_id(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.env"
    path.write_text("KM_ALIAS=goose\n# KM_SANDBOX_ID=commented-out\n", encoding="utf-8")
    with pytest.raises(ValidationError):
        load_identity(path)


def test_identity_reads_the_file_the_way_the_boot_script_does(tmp_path: Path) -> None:
    """The boot script sources sandbox.env with `set -a; . file`; both must see the same values."""
    path = tmp_path / "sandbox.env"
    path.write_text(
        "# km\nKM_SANDBOX_ID=od-0a1b2c3d\nKM_ALIAS='open dev'\nKM_ARTIFACTS_URI=\"s3://bucket/with/prefix\"\n\nKM_RESOURCE_PREFIX=km\n",
        encoding="utf-8",
    )
    shell = (
        subprocess.run(
            [
                "bash",
                "-c",
                f'set -a; . "{path}"; set +a; printf "%s\\0" "$KM_SANDBOX_ID" "$KM_ALIAS" "$KM_ARTIFACTS_URI" "$KM_RESOURCE_PREFIX"',
            ],
            capture_output=True,
            check=True,
            env={"PATH": os.environ["PATH"]},
        )
        .stdout.decode()
        .split("\0")[:-1]
    )
    identity = load_identity(path)
    assert [identity.sandbox_id, identity.alias, identity.artifacts_uri, identity.resource_prefix] == shell


def test_identity_is_frozen() -> None:
    identity = SandboxIdentity(sandbox_id="sb-1")
    with pytest.raises(ValidationError):
        identity.sandbox_id = "sb-2"  # type: ignore[misc]


def test_the_sandbox_side_imports_nothing_from_the_operator_side() -> None:
    """host_agent.config is loaded on the sandbox, where neither controller nor its dependencies exist."""
    code = (
        "import sys, host_agent.config, host_agent.cli\n"
        "heavy = ('controller', 'boto3', 'botocore', 'doit', 'yaml', 'click', 'rich')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_check_config_command(tmp_path: Path) -> None:
    path = tmp_path / "host-agent.json"
    path.write_text(full_config().to_json(), encoding="utf-8")
    ok = subprocess.run(
        [sys.executable, "-m", "host_agent.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid (profile tiny, enforcement both)" in ok.stdout
    path.write_text(json.dumps({**minimal_document(), "schema_version": 2}), encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "host_agent.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "schema_version" in bad.stderr
