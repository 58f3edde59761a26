"""The SandboxProfile schema, `klankermaker.ai/v1alpha1`.

Every field a profile may hold is declared here, with its default and a one-line description that the
profile reference in the README is generated from. Unknown fields are errors (a typo in a security
policy must never be ignored), types are strict (`spot: "no"` is a mistake, not a boolean), and fields
that would be accepted but do nothing are deliberately absent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from controller.profile.field_types import (
    CIDR,
    TTL,
    AbsolutePath,
    AmiRef,
    DNSSuffix,
    Duration,
    EmailAddress,
    GitHubRepoPattern,
    HostName,
    InstanceType,
    LabelKey,
    ProfileName,
    RefGlob,
    Region,
    SandboxPrefix,
    ShellIdentifier,
    SSMPath,
)

API_VERSION = "klankermaker.ai/v1alpha1"
KIND = "SandboxProfile"

Substrate = Literal["ec2", "local"]
TeardownPolicy = Literal["destroy", "stop", "retain"]
Enforcement = Literal["ebpf", "proxy", "both"]
EmailRequirement = Literal["required", "optional", "off"]
TLSLibrary = Literal["openssl", "gnutls", "nss", "go", "rustls"]
AgentName = Literal["claude", "codex", "goose"]


class ProfileModel(BaseModel):
    """Base for every section: camelCase names in YAML, no unknown fields, no type coercion."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


class Metadata(ProfileModel):
    name: ProfileName = Field(description="Profile name; sandboxes are aliased to it by default.")
    labels: dict[LabelKey, str] = Field(default_factory=dict, description="Free-form labels copied to resource tags.")
    prefix: SandboxPrefix = Field("sb", description="Sandbox id prefix: ids are `<prefix>-<8 hex>`.")
    abstract: bool = Field(False, description="A fragment for `extends` only: never created, not inherited.")


class Lifecycle(ProfileModel):
    ttl: TTL = Field(description='Teardown after this long (`30s`, `4h`, `7d`, `4h30m`); `"0"` means never.')
    idle_timeout: Duration = Field(description="Teardown policy applies after this long without activity.")
    teardown_policy: TeardownPolicy = Field(description="What TTL and idle expiry do: `destroy`, `stop` or `retain`.")


class AdditionalVolume(ProfileModel):
    size: int = Field(ge=1, le=16384, description="Size in GiB (gp3 on EC2, a host directory on local).")
    mount_point: AbsolutePath = Field(description="Where it is mounted inside the sandbox.")
    encrypted: bool = Field(False, description="Encrypt the EBS volume.")


class Runtime(ProfileModel):
    substrate: Substrate = Field(description="`ec2` (an EC2 instance) or `local` (a systemd-nspawn machine).")
    spot: bool = Field(False, description="Use spot capacity (EC2); incompatible with hibernation.")
    instance_type: InstanceType = Field(description="EC2 instance type, e.g. `t3.medium`.")
    region: Region = Field(description="AWS region the sandbox runs in.")
    root_volume_size: int = Field(0, ge=0, le=16384, description="Root volume in GiB; 0 keeps the image's size.")
    hibernation: bool = Field(False, description="Pause keeps RAM on disk (on-demand only; root must exceed RAM).")
    ami: AmiRef | None = Field(
        None,
        description="Image slug (`amazon-linux-2023`, `ubuntu-24.04`, `ubuntu-22.04`, `debian-12`) or an `ami-…` id; "
        "local sandboxes also take any recipe in `amis/` (`debian-12-resolved`: systemd-resolved and nscd, as on EC2 AMIs).",
    )
    mount_efs: bool = Field(False, alias="mountEFS", description="Mount the shared EFS file system.")
    efs_mount_point: AbsolutePath = Field("/shared", alias="efsMountPoint", description="Where EFS is mounted.")
    additional_volume: AdditionalVolume | None = Field(None, description="A second data volume.")


class Execution(ProfileModel):
    shell: AbsolutePath = Field(description="Login shell of the `sandbox` user.")
    working_dir: AbsolutePath = Field(description="Where agents run; run records live under `<workingDir>/.km-agent/`.")
    use_bedrock: bool = Field(False, description="Give agents Amazon Bedrock credentials and environment (SigV4).")
    privileged: bool = Field(False, description="Give the `sandbox` user passwordless sudo.")
    env: dict[ShellIdentifier, str] = Field(default_factory=dict, description="Environment for every agent and shell.")
    config_files: dict[AbsolutePath, str] = Field(default_factory=dict, description="Files written at boot (path → content).")
    init_commands: list[str] = Field(default_factory=list, description="Root shell commands run in order at first boot.")


class SpendCap(ProfileModel):
    max_spend_usd: float = Field(ge=0, alias="maxSpendUSD", description="Cap in US dollars; 0 means no cap.")


class Budget(ProfileModel):
    compute: SpendCap | None = Field(None, description="Compute spend cap.")
    ai: SpendCap | None = Field(None, description="AI model spend cap.")
    warning_threshold: float = Field(0.8, description="Warn when spend reaches this fraction, in (0, 1].")


class Egress(ProfileModel):
    allowed_dns_suffixes: list[DNSSuffix] = Field(
        default_factory=list,
        alias="allowedDNSSuffixes",
        description="Names allowed by suffix (`.github.com` matches `github.com` and below); `*` allows all.",
    )
    allowed_hosts: list[HostName] = Field(default_factory=list, description="Exact host names allowed.")
    allowed_cidrs: list[CIDR] = Field(default_factory=list, alias="allowedCIDRs", description="Address blocks allowed.")


class Network(ProfileModel):
    enforcement: Enforcement = Field("ebpf", description="`ebpf` (kernel gate), `proxy` (L7 proxy by Host/SNI) or `both`.")
    egress: Egress = Field(default_factory=Egress, description="The egress allowlist; everything else is denied.")


class GitHubAccess(ProfileModel):
    allowed_repos: list[GitHubRepoPattern] = Field(default_factory=list, description="`owner/repo`, `owner/*` or `*`.")
    allowed_refs: list[RefGlob] = Field(default_factory=list, description="Ref globs pushes may target, e.g. `feature/*`.")


class SourceAccess(ProfileModel):
    mode: Literal["allowlist", "none"] = Field("none", description="`allowlist` (only listed repos) or `none`.")
    github: GitHubAccess | None = Field(None, description="GitHub repositories and refs.")


class Identity(ProfileModel):
    role_session_duration: Duration = Field("1h", description="Instance role session length (1h to 12h).")
    allowed_regions: list[Region] = Field(min_length=1, description="AWS API calls are denied outside these regions.")
    session_policy: Literal["minimal"] = Field("minimal", description="`minimal`: only what km itself needs.")
    allowed_secret_paths: list[SSMPath] = Field(default_factory=list, description="SSM parameters readable at boot.")


class Artifacts(ProfileModel):
    paths: list[AbsolutePath] = Field(default_factory=list, description="Files or directories uploaded at teardown.")
    max_size_mb: int = Field(0, ge=0, alias="maxSizeMB", description="Upload cap in MB; 0 means no cap.")


class CLIDefaults(ProfileModel):
    agent: AgentName = Field("claude", description="Default agent for `km agent run`.")
    claude_args: list[str] = Field(default_factory=list, description="Extra arguments for Claude Code.")
    codex_args: list[str] = Field(default_factory=list, description="Extra arguments for Codex.")
    goose_args: list[str] = Field(default_factory=list, description="Extra arguments for Goose.")
    no_bedrock: bool = Field(False, description="Default for `--no-bedrock`.")
    notify_on_permission: bool = Field(False, description="Notify when an agent waits for permission.")
    notify_on_idle: bool = Field(False, description="Notify when an agent goes idle.")
    notify_cooldown_seconds: int = Field(0, ge=0, description="Minimum seconds between notifications.")
    notify_email_enabled: bool = Field(False, description="Send notifications by email.")
    notification_email_address: EmailAddress | None = Field(None, description="Where notification email goes.")
    notify_slack_enabled: bool = Field(False, description="Send notifications to Slack.")
    notify_slack_per_sandbox: bool = Field(False, description="One Slack channel per sandbox.")
    notify_slack_channel_override: str | None = Field(
        None, pattern=r"^C[A-Z0-9]+$", description="Post to this Slack channel id instead."
    )
    notify_slack_inbound_enabled: bool = Field(False, description="Slack messages in the channel start agent turns.")
    notify_slack_transcript_enabled: bool = Field(False, description="Stream agent transcripts to Slack.")
    slack_archive_on_destroy: bool = Field(True, description="Archive the per-sandbox channel at destroy.")


class Email(ProfileModel):
    signing: EmailRequirement = Field("optional", description="Sign outbound mail (Ed25519).")
    verify_inbound: EmailRequirement = Field("optional", description="Verify signatures of inbound mail.")
    encryption: EmailRequirement = Field("off", description="Encrypt mail between sandboxes.")
    alias: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]*\.[a-z][a-z0-9-]*$", description="Mail alias `team.name`.")
    allowed_senders: list[str] = Field(default_factory=list, description="`self`, sandbox ids, alias globs or `*`.")


class ClaudeTelemetry(ProfileModel):
    enabled: bool = Field(True, description="Turn on Claude Code's OpenTelemetry export.")
    log_prompts: bool = Field(False, description="Include user prompts in telemetry.")
    log_tool_details: bool = Field(False, description="Include tool arguments in telemetry.")


def _openssl_only() -> list[TLSLibrary]:
    return ["openssl"]


class TLSCapture(ProfileModel):
    enabled: bool = Field(False, description="Capture TLS plaintext with uprobes (costs ~20 µs per SSL call).")
    libraries: list[TLSLibrary] = Field(default_factory=_openssl_only, description="TLS libraries to hook.")
    capture_payloads: bool = Field(False, description="Record the first bytes of plaintext, not only metadata.")
    max_payload_bytes: int = Field(
        4096, ge=1, le=4096, description="Bytes of plaintext kept per SSL call (the kernel copies at most 4096)."
    )


class Observability(ProfileModel):
    claude_telemetry: ClaudeTelemetry = Field(default_factory=ClaudeTelemetry, description="Claude Code telemetry.")
    tls_capture: TLSCapture = Field(default_factory=TLSCapture, alias="tlsCapture", description="TLS plaintext capture.")
    learn_mode: bool = Field(False, description="Record would-be denials instead of blocking, to draft an allowlist.")


class Spec(ProfileModel):
    lifecycle: Lifecycle = Field(description="When the sandbox ends.")
    runtime: Runtime = Field(description="Where and on what it runs.")
    execution: Execution = Field(description="The environment agents run in.")
    budget: Budget | None = Field(None, description="Spend caps.")
    network: Network = Field(description="Egress policy.")
    source_access: SourceAccess = Field(default_factory=SourceAccess, description="Source repository access.")
    identity: Identity | None = Field(None, description="The sandbox's AWS identity; regions default to runtime.region.")
    artifacts: Artifacts | None = Field(None, description="Files kept after the sandbox ends.")
    cli: CLIDefaults = Field(default_factory=CLIDefaults, description="Operator-side defaults and notifications.")
    email: Email | None = Field(None, description="Sandbox email identity.")
    observability: Observability = Field(default_factory=Observability, description="Telemetry and capture.")


class SandboxProfile(ProfileModel):
    """A complete, merged profile: what `km compile` turns into a sandbox plan."""

    api_version: Literal["klankermaker.ai/v1alpha1"] = Field(description="Always `klankermaker.ai/v1alpha1`.")
    kind: Literal["SandboxProfile"] = Field(description="Always `SandboxProfile`.")
    metadata: Metadata = Field(description="Name, labels, id prefix.")
    spec: Spec = Field(description="The sandbox.")

    def dump(self) -> dict[str, object]:
        """The profile as plain data with YAML field names and every default filled in."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
