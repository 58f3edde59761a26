"""`host-agent.json`: the one contract between the operator side and the sandbox daemon.

The controller's compiler writes it from a profile; `km-host-agent` reads it at start and on SIGHUP.
It holds already-resolved policy (durations in seconds, DNS names normalised) so the daemon never has
to understand profiles, and the sandbox side imports nothing from the controller.

Per-sandbox identity (the sandbox id, where artifacts go) is not known when a profile is compiled; the
substrate writes it to `sandbox.env` before first boot and `load_identity` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from host_agent.paths import CONFIG_PATH, SANDBOX_ENV_PATH

SCHEMA_VERSION: Literal[1] = 1


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LifecyclePolicy(_Contract):
    ttl_seconds: int = Field(ge=0, description="0 means no automatic teardown.")
    idle_timeout_seconds: int = Field(gt=0)
    teardown_policy: Literal["destroy", "stop", "retain"]


class ExecutionPolicy(_Contract):
    working_dir: str
    shell: str
    env: dict[str, str] = Field(default_factory=dict)
    bedrock_env: dict[str, str] = Field(default_factory=dict, description="Removed from agent runs by --no-bedrock.")
    default_agent: Literal["claude", "codex", "goose"] = "claude"
    agent_args: dict[str, list[str]] = Field(default_factory=dict)
    no_bedrock_default: bool = False


class EgressPolicy(_Contract):
    enforcement: Literal["ebpf", "proxy", "both"]
    mode: Literal["enforce", "log"] = Field(description="`log` records would-be denials without blocking (learn mode).")
    allowed_dns_suffixes: list[str] = Field(default_factory=list, description="Lower-case IDNA, no leading dot; `*` for all.")
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_cidrs: list[str] = Field(default_factory=list)


class TLSCapturePolicy(_Contract):
    enabled: bool = False
    libraries: list[str] = Field(default_factory=lambda: ["openssl"])
    capture_payloads: bool = False
    max_payload_bytes: int = 4096


class ClaudeTelemetryPolicy(_Contract):
    enabled: bool = True
    log_prompts: bool = False
    log_tool_details: bool = False


class ObservabilityPolicy(_Contract):
    tls_capture: TLSCapturePolicy = Field(default_factory=TLSCapturePolicy)
    claude_telemetry: ClaudeTelemetryPolicy = Field(default_factory=ClaudeTelemetryPolicy)


class BudgetPolicy(_Contract):
    compute_max_usd: float | None = Field(None, ge=0, description="None or 0: no cap.")
    ai_max_usd: float | None = Field(None, ge=0)
    warning_threshold: float = Field(0.8, gt=0, le=1)


class SourceAccessPolicy(_Contract):
    mode: Literal["allowlist", "none"] = "none"
    allowed_repos: list[str] = Field(default_factory=list)
    allowed_refs: list[str] = Field(default_factory=list)


class ArtifactsPolicy(_Contract):
    paths: list[str] = Field(default_factory=list)
    max_size_mb: int = 0


class HostAgentConfig(_Contract):
    """Everything the daemon enforces in one sandbox."""

    schema_version: Literal[1] = SCHEMA_VERSION
    profile: str
    substrate: Literal["ec2", "local"]
    region: str
    lifecycle: LifecyclePolicy
    execution: ExecutionPolicy
    egress: EgressPolicy
    observability: ObservabilityPolicy = Field(default_factory=ObservabilityPolicy)
    budget: BudgetPolicy = Field(default_factory=BudgetPolicy)
    source_access: SourceAccessPolicy = Field(default_factory=SourceAccessPolicy)
    artifacts: ArtifactsPolicy = Field(default_factory=ArtifactsPolicy)

    def to_json(self) -> str:
        """Stable, sorted JSON: the same policy always serialises to the same bytes (it is hashed)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class SandboxIdentity(_Contract):
    """Who this sandbox is; written by the substrate at create, not by the compiler."""

    sandbox_id: str
    alias: str | None = None
    artifacts_uri: str | None = Field(None, description="s3://bucket/prefix, or a local directory on the local substrate.")
    resource_prefix: str = "km"
    dns_upstream: str | None = Field(None, description="IP[:PORT] the sandbox's resolver forwards to; default: resolv.conf's.")


def load_config(path: Path = CONFIG_PATH) -> HostAgentConfig:
    return HostAgentConfig.model_validate_json(path.read_text(encoding="utf-8"))


def load_identity(path: Path = SANDBOX_ENV_PATH) -> SandboxIdentity:
    """Parse `KEY=value` lines (KM_SANDBOX_ID, KM_ALIAS, KM_ARTIFACTS_URI, KM_RESOURCE_PREFIX, KM_DNS_UPSTREAM)."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    fields = {
        "KM_SANDBOX_ID": "sandbox_id",
        "KM_ALIAS": "alias",
        "KM_ARTIFACTS_URI": "artifacts_uri",
        "KM_RESOURCE_PREFIX": "resource_prefix",
        "KM_DNS_UPSTREAM": "dns_upstream",
    }
    return SandboxIdentity.model_validate({name: values[key] for key, name in fields.items() if key in values})
