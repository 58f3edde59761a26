"""Profile → host-agent.json: durations in seconds, normalised DNS names, Bedrock env kept apart, learn mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.compiler import compile_profile
from controller.compiler.host_agent_config import host_agent_config
from controller.profile import BUILTIN_PROFILES_DIR, format_duration, load_profile
from controller.profile.catalog import builtin_profiles
from host_agent.config import HostAgentConfig
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
CREATABLE = [entry.name for entry in builtin_profiles() if not entry.abstract]
BEDROCK_KEYS = {"CLAUDE_CODE_USE_BEDROCK", "AWS_REGION", "AWS_DEFAULT_REGION"}


@pytest.mark.parametrize(
    ("ttl", "idle_timeout", "ttl_seconds", "idle_seconds"),
    [
        ("7d", "1h", 604_800, 3_600),
        ("4h30m", "1h", 16_200, 3_600),
        ("0", "1h", 0, 3_600),
        ("4h", "45m", 14_400, 2_700),
        ("1d12h", "30s", 129_600, 30),
        ("90m", "90s", 5_400, 90),
        ("2d3h4m5s", "1d", 183_845, 86_400),
    ],
)
def test_durations_become_seconds(tmp_path: Path, ttl: str, idle_timeout: str, ttl_seconds: int, idle_seconds: int) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["lifecycle"]["ttl"] = ttl
        spec["lifecycle"]["idleTimeout"] = idle_timeout

    lifecycle = host_agent_config(goose_variant(tmp_path, edit)).lifecycle
    assert (lifecycle.ttl_seconds, lifecycle.idle_timeout_seconds) == (ttl_seconds, idle_seconds)
    assert lifecycle.teardown_policy == "stop"


@given(seconds=st.integers(min_value=1, max_value=400 * 86_400))
def test_any_canonical_ttl_becomes_its_seconds(seconds: int) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["lifecycle"]["ttl"] = format_duration(seconds)
        spec["lifecycle"]["idleTimeout"] = "1s"

    # The document is never read from disk, so a fixed name serves every example.
    config = host_agent_config(goose_variant(Path("/nonexistent/km-test"), edit))
    assert config.lifecycle.ttl_seconds == seconds
    assert config.lifecycle.idle_timeout_seconds == 1


LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@given(
    labels=st.lists(LABEL, min_size=2, max_size=4),
    upper=st.lists(st.booleans(), min_size=48, max_size=48),
    leading_dot=st.booleans(),
    trailing_dot=st.booleans(),
)
def test_any_spelling_of_a_suffix_normalises_to_lower_case_without_dots(
    labels: list[str], upper: list[bool], leading_dot: bool, trailing_dot: bool
) -> None:
    name = ".".join(labels)
    spelled = "".join(char.upper() if flip else char for char, flip in zip(name, upper + [False] * len(name)))
    written = ("." if leading_dot else "") + spelled + ("." if trailing_dot else "")

    def edit(spec: dict[str, Any]) -> None:
        spec["network"]["egress"]["allowedDNSSuffixes"] = [written, name]

    assert host_agent_config(goose_variant(Path("/nonexistent/km-test"), edit)).egress.allowed_dns_suffixes == [name]


@pytest.mark.parametrize(
    ("written", "normalised"),
    [
        ([".GitHub.COM."], ["github.com"]),
        (["*"], ["*"]),
        ([".bücher.example"], ["xn--bcher-kva.example"]),
        (["github.com", ".github.com", ".GITHUB.com"], ["github.com"]),
        ([".npmjs.org", "*", ".PyPI.org"], ["npmjs.org", "*", "pypi.org"]),
        ([".MÜNCHEN.example."], ["xn--mnchen-3ya.example"]),
    ],
)
def test_dns_suffixes_are_normalised_once(tmp_path: Path, written: list[str], normalised: list[str]) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["network"]["egress"]["allowedDNSSuffixes"] = written

    egress = host_agent_config(goose_variant(tmp_path, edit)).egress
    assert egress.allowed_dns_suffixes == normalised


def test_dns_suffixes_use_idna_2008(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["network"]["egress"]["allowedDNSSuffixes"] = [".straße.de"]

    assert host_agent_config(goose_variant(tmp_path, edit)).egress.allowed_dns_suffixes == ["xn--strae-oqa.de"]


def test_allowed_hosts_are_normalised_and_deduplicated(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["network"]["egress"]["allowedHosts"] = ["API.GitHub.com", "api.github.com.", "straßen-bücher.example"]
        spec["network"]["egress"]["allowedCIDRs"] = ["10.0.0.0/8", "10.0.0.0/8"]

    egress = host_agent_config(goose_variant(tmp_path, edit)).egress
    assert egress.allowed_hosts[0] == "api.github.com"
    assert len(egress.allowed_hosts) == 2
    assert egress.allowed_hosts[1].startswith("xn--") and egress.allowed_hosts[1].isascii()
    assert egress.allowed_cidrs == ["10.0.0.0/8"]


@pytest.mark.parametrize("use_bedrock", [True, False])
def test_bedrock_env_only_with_use_bedrock(tmp_path: Path, use_bedrock: bool) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["useBedrock"] = use_bedrock
        spec["runtime"]["region"] = "us-west-2"
        spec["identity"]["allowedRegions"] = ["us-west-2"]

    execution = host_agent_config(goose_variant(tmp_path, edit)).execution
    if use_bedrock:
        assert execution.bedrock_env == {
            "CLAUDE_CODE_USE_BEDROCK": "1",
            "AWS_REGION": "us-west-2",
            "AWS_DEFAULT_REGION": "us-west-2",
        }
    else:
        assert execution.bedrock_env == {}
    # The profile's own environment is never mixed into the Bedrock one, nor the other way round.
    assert {k: v for k, v in execution.env.items() if not k.startswith(("OTEL_", "CLAUDE_CODE_ENABLE"))} == {
        "GOOSE_PROVIDER": "aws_bedrock",
        "GOOSE_MODEL": "us.anthropic.claude-opus-4-6-v1",
    }
    assert not set(execution.env) & set(execution.bedrock_env)


@pytest.mark.parametrize(("prompts", "tools"), [(False, False), (True, False), (False, True)])
def test_claude_telemetry_exports_to_the_host_agents_receiver(tmp_path: Path, prompts: bool, tools: bool) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["observability"]["claudeTelemetry"] = {"enabled": True, "logPrompts": prompts, "logToolDetails": tools}

    env = host_agent_config(goose_variant(tmp_path, edit)).execution.env
    assert env["CLAUDE_CODE_ENABLE_TELEMETRY"] == "1"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert (env["OTEL_LOGS_EXPORTER"], env["OTEL_METRICS_EXPORTER"]) == ("otlp", "otlp")
    assert (env["OTEL_LOG_USER_PROMPTS"], env["OTEL_LOG_TOOL_DETAILS"]) == (str(int(prompts)), str(int(tools)))


def test_claude_telemetry_off_sets_nothing_and_the_profile_env_wins(tmp_path: Path) -> None:
    def disabled(spec: dict[str, Any]) -> None:
        spec["observability"]["claudeTelemetry"] = {"enabled": False}

    def overridden(spec: dict[str, Any]) -> None:
        spec["execution"]["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://collector.example.test:4318"

    assert not any(
        k.startswith(("OTEL_", "CLAUDE_CODE_ENABLE")) for k in host_agent_config(goose_variant(tmp_path, disabled)).execution.env
    )
    env = host_agent_config(goose_variant(tmp_path / "b", overridden)).execution.env
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.example.test:4318"


def test_profile_env_wins_and_is_not_duplicated_into_bedrock_env(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["env"]["AWS_REGION"] = "eu-west-1"

    execution = host_agent_config(goose_variant(tmp_path, edit)).execution
    assert execution.env["AWS_REGION"] == "eu-west-1"
    assert "AWS_REGION" not in execution.bedrock_env
    assert execution.bedrock_env == {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_DEFAULT_REGION": "us-east-1"}
    assert not set(execution.env) & set(execution.bedrock_env)


@pytest.mark.parametrize(("learn_mode", "mode"), [(True, "log"), (False, "enforce")])
def test_learn_mode_logs_instead_of_enforcing(tmp_path: Path, learn_mode: bool, mode: str) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["observability"]["learnMode"] = learn_mode

    egress = host_agent_config(goose_variant(tmp_path, edit)).egress
    assert egress.mode == mode
    assert egress.enforcement == "both"


def test_goose_config() -> None:
    profile, _ = load_profile(GOOSE_FILE)
    config = host_agent_config(profile)
    assert (config.profile, config.substrate, config.region) == ("goose", "ec2", "us-east-1")
    assert (config.lifecycle.ttl_seconds, config.lifecycle.idle_timeout_seconds) == (14_400, 3_600)
    assert config.egress.allowed_dns_suffixes == [
        "amazonaws.com",
        "anthropic.com",
        "github.com",
        "githubusercontent.com",
        "npmjs.org",
        "pypi.org",
    ]
    assert (config.budget.compute_max_usd, config.budget.ai_max_usd, config.budget.warning_threshold) == (0.5, 1.0, 0.8)
    assert config.source_access.mode == "allowlist"
    assert config.source_access.allowed_repos == ["my-org/api", "my-org/infra"]
    assert config.source_access.allowed_refs == ["main", "feature/*", "fix/*"]
    assert config.observability.tls_capture.enabled and config.observability.tls_capture.libraries == ["openssl"]
    assert config.observability.claude_telemetry.log_prompts and config.observability.claude_telemetry.log_tool_details
    assert config.execution.working_dir == "/workspace" and config.execution.shell == "/bin/bash"


def test_no_budget_section_means_no_caps(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        del spec["budget"]

    budget = host_agent_config(goose_variant(tmp_path, edit)).budget
    assert (budget.compute_max_usd, budget.ai_max_usd, budget.warning_threshold) == (None, None, 0.8)


@pytest.mark.parametrize("name", CREATABLE)
def test_round_trip_through_json(name: str) -> None:
    profile, _ = load_profile(name)
    config = host_agent_config(profile)
    assert HostAgentConfig.model_validate_json(config.to_json()) == config


@pytest.mark.parametrize("name", CREATABLE)
def test_json_is_byte_stable(name: str) -> None:
    profile, _ = load_profile(name)
    first = host_agent_config(profile).to_json()
    second = host_agent_config(load_profile(name)[0]).to_json()
    assert first == second
    assert HostAgentConfig.model_validate_json(first).to_json() == first
    # Sorted keys, two-space indent, one trailing newline: the bytes that get hashed.
    assert first == json.dumps(json.loads(first), indent=2, sort_keys=True) + "\n"


def test_compiled_host_agent_file_is_the_config(tmp_path: Path) -> None:
    profile = goose_variant(tmp_path)
    compiled = compile_profile(profile)
    assert compiled.files()["host-agent.json"] == host_agent_config(profile).to_json()
    assert compiled.plan["hostAgent"] == json.loads(compiled.files()["host-agent.json"])
