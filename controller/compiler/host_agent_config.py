"""Profile → `host-agent.json`: resolve everything the daemon enforces into plain values.

Durations become seconds, DNS names are normalised once here (lower-case IDNA, no leading dot) so the
daemon's matcher compares like with like, and the Bedrock environment is kept apart from the
profile's own so `--no-bedrock` can remove exactly it.
"""

from __future__ import annotations

from controller.profile import SandboxProfile, parse_duration
from host_agent.config import (
    ArtifactsPolicy,
    BudgetPolicy,
    ClaudeTelemetryPolicy,
    EgressPolicy,
    ExecutionPolicy,
    HostAgentConfig,
    LifecyclePolicy,
    ObservabilityPolicy,
    SourceAccessPolicy,
    TLSCapturePolicy,
)
from host_agent.dnsnames import normalise_dns_name
from host_agent.paths import OTLP_RECEIVER_PORT


def bedrock_env(profile: SandboxProfile) -> dict[str, str]:
    """Environment that points Claude Code at Bedrock with the instance role's SigV4 credentials."""
    if not profile.spec.execution.use_bedrock:
        return {}
    region = profile.spec.runtime.region
    return {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": region, "AWS_DEFAULT_REGION": region}


def claude_telemetry_env(profile: SandboxProfile) -> dict[str, str]:
    """Claude Code's own OpenTelemetry export, pointed at the host agent's loopback receiver.

    Claude Code carries its own TLS stack, which libssl uprobes cannot see: its telemetry is how its
    prompts, API requests and tool decisions reach the operator. Short export intervals, because a run
    can end within the SDK's default minute.
    """
    telemetry = profile.spec.observability.claude_telemetry
    if not telemetry.enabled:
        return {}
    return {
        "CLAUDE_CODE_ENABLE_TELEMETRY": "1",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{OTLP_RECEIVER_PORT}",
        "OTEL_METRIC_EXPORT_INTERVAL": "10000",
        "OTEL_LOGS_EXPORT_INTERVAL": "5000",
        "OTEL_LOG_USER_PROMPTS": "1" if telemetry.log_prompts else "0",
        "OTEL_LOG_TOOL_DETAILS": "1" if telemetry.log_tool_details else "0",
    }


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def host_agent_config(profile: SandboxProfile) -> HostAgentConfig:
    spec = profile.spec
    egress = spec.network.egress
    budget = spec.budget
    github = spec.source_access.github
    observability = spec.observability
    return HostAgentConfig(
        profile=profile.metadata.name,
        substrate=spec.runtime.substrate,
        region=spec.runtime.region,
        lifecycle=LifecyclePolicy(
            ttl_seconds=parse_duration(spec.lifecycle.ttl),
            idle_timeout_seconds=parse_duration(spec.lifecycle.idle_timeout),
            teardown_policy=spec.lifecycle.teardown_policy,
        ),
        execution=ExecutionPolicy(
            working_dir=spec.execution.working_dir,
            shell=spec.execution.shell,
            env={**claude_telemetry_env(profile), **spec.execution.env},  # the profile's own settings win
            bedrock_env={k: v for k, v in bedrock_env(profile).items() if k not in spec.execution.env},
            default_agent=spec.cli.agent,
            agent_args={
                "claude": list(spec.cli.claude_args),
                "codex": list(spec.cli.codex_args),
                "goose": list(spec.cli.goose_args),
            },
            no_bedrock_default=spec.cli.no_bedrock,
        ),
        egress=EgressPolicy(
            enforcement=spec.network.enforcement,
            mode="log" if observability.learn_mode else "enforce",
            allowed_dns_suffixes=_unique([s if s == "*" else normalise_dns_name(s) for s in egress.allowed_dns_suffixes]),
            allowed_hosts=_unique([normalise_dns_name(h) for h in egress.allowed_hosts]),
            allowed_cidrs=_unique(list(egress.allowed_cidrs)),
        ),
        observability=ObservabilityPolicy(
            tls_capture=TLSCapturePolicy(
                enabled=observability.tls_capture.enabled,
                libraries=list(observability.tls_capture.libraries),
                capture_payloads=observability.tls_capture.capture_payloads,
                max_payload_bytes=observability.tls_capture.max_payload_bytes,
            ),
            claude_telemetry=ClaudeTelemetryPolicy(
                enabled=observability.claude_telemetry.enabled,
                log_prompts=observability.claude_telemetry.log_prompts,
                log_tool_details=observability.claude_telemetry.log_tool_details,
            ),
        ),
        budget=BudgetPolicy(
            compute_max_usd=budget.compute.max_spend_usd if budget and budget.compute else None,
            ai_max_usd=budget.ai.max_spend_usd if budget and budget.ai else None,
            warning_threshold=budget.warning_threshold if budget else 0.8,
        ),
        source_access=SourceAccessPolicy(
            mode=spec.source_access.mode,
            allowed_repos=list(github.allowed_repos) if github else [],
            allowed_refs=list(github.allowed_refs) if github else [],
        ),
        artifacts=ArtifactsPolicy(
            paths=list(spec.artifacts.paths) if spec.artifacts else [],
            max_size_mb=spec.artifacts.max_size_mb if spec.artifacts else 0,
        ),
    )
