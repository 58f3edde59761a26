"""Semantic rules: relations between fields that a type alone cannot express.

Each rule is a small function from a schema-valid profile to findings, each at the field the operator
should change and with the fix in its message. `RULES` runs them all; tests table-drive each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from controller.profile.durations import parse_duration
from controller.profile.errors import FieldPath, Finding
from controller.profile.schema import SandboxProfile

Rule = Callable[[SandboxProfile], Iterator[Finding]]
RULES: list[Rule] = []

EBPF_CAPABLE_SUBSTRATES = frozenset({"ec2", "local"})
RESERVED_MOUNT_POINTS = ("/", "/proc", "/sys", "/dev", "/etc", "/usr", "/boot", "/tmp", "/run")
ROLE_SESSION_BOUNDS_SECONDS = (3_600, 43_200)  # IAM MaxSessionDuration: 1 hour to 12 hours

# Memory of common instance types, GiB: hibernation writes RAM to the root volume, so it must fit.
INSTANCE_MEMORY_GIB: dict[str, float] = {
    **{
        f"{family}.{size}": ram
        for family in ("t3", "t3a")
        for size, ram in (("nano", 0.5), ("micro", 1), ("small", 2), ("medium", 4), ("large", 8), ("xlarge", 16), ("2xlarge", 32))
    },
    **{f"t2.{size}": ram for size, ram in (("micro", 1), ("small", 2), ("medium", 4), ("large", 8), ("xlarge", 16))},
    **{
        f"{family}.{size}": ram
        for family in ("m5", "m5a", "m6i", "m6a", "m7i", "m7a")
        for size, ram in (("large", 8), ("xlarge", 16), ("2xlarge", 32), ("4xlarge", 64), ("8xlarge", 128))
    },
    **{
        f"{family}.{size}": ram
        for family in ("c5", "c5a", "c6i", "c6a", "c7i")
        for size, ram in (("large", 4), ("xlarge", 8), ("2xlarge", 16), ("4xlarge", 32), ("8xlarge", 64))
    },
    **{
        f"{family}.{size}": ram
        for family in ("r5", "r5a", "r6i", "r7i")
        for size, ram in (("large", 16), ("xlarge", 32), ("2xlarge", 64), ("4xlarge", 128))
    },
}


def rule(function: Rule) -> Rule:
    RULES.append(function)
    return function


def check_rules(profile: SandboxProfile) -> list[Finding]:
    return [finding for each in RULES for finding in each(profile)]


def _at(*path: str | int) -> FieldPath:
    return ("spec",) + path


@rule
def ttl_covers_idle_timeout(profile: SandboxProfile) -> Iterator[Finding]:
    lifecycle = profile.spec.lifecycle
    ttl, idle = parse_duration(lifecycle.ttl), parse_duration(lifecycle.idle_timeout)
    if ttl and ttl < idle:
        yield Finding(
            _at("lifecycle", "ttl"),
            f"ttl {lifecycle.ttl} is shorter than idleTimeout {lifecycle.idle_timeout}; "
            f'raise ttl to at least {lifecycle.idle_timeout}, lower idleTimeout, or set ttl: "0"',
        )


@rule
def hibernation_needs_on_demand(profile: SandboxProfile) -> Iterator[Finding]:
    runtime = profile.spec.runtime
    if runtime.hibernation and runtime.spot:
        yield Finding(_at("runtime", "spot"), "hibernation requires spot: false (hibernation is on-demand only)")


@rule
def spot_is_not_stopped(profile: SandboxProfile) -> Iterator[Finding]:
    """km launches one-time spot instances, which EC2 cannot stop: only destroy or retain can end them."""
    runtime, lifecycle = profile.spec.runtime, profile.spec.lifecycle
    if runtime.spot and runtime.substrate == "ec2" and lifecycle.teardown_policy == "stop":
        yield Finding(
            _at("lifecycle", "teardownPolicy"),
            "a spot instance cannot be stopped: set teardownPolicy: destroy (or retain), or spot: false",
        )


@rule
def hibernation_root_volume_holds_memory(profile: SandboxProfile) -> Iterator[Finding]:
    runtime = profile.spec.runtime
    memory = INSTANCE_MEMORY_GIB.get(runtime.instance_type)
    if not runtime.hibernation or memory is None:
        return
    if runtime.root_volume_size <= memory:
        yield Finding(
            _at("runtime", "rootVolumeSize"),
            f"hibernation stores RAM on the root volume: {runtime.instance_type} has {memory:g} GiB of memory, "
            f"so set rootVolumeSize above {memory:g} (it is {runtime.root_volume_size or 'the image default'})",
        )


@rule
def ebpf_enforcement_needs_capable_substrate(profile: SandboxProfile) -> Iterator[Finding]:
    substrate = profile.spec.runtime.substrate
    enforcement = profile.spec.network.enforcement
    if enforcement in ("ebpf", "both") and substrate not in EBPF_CAPABLE_SUBSTRATES:
        yield Finding(
            _at("network", "enforcement"),
            f"enforcement {enforcement} needs substrate ec2 or local (got {substrate}); use enforcement: proxy",
        )


@rule
def warning_threshold_is_a_fraction(profile: SandboxProfile) -> Iterator[Finding]:
    budget = profile.spec.budget
    if budget is not None and not 0 < budget.warning_threshold <= 1:
        yield Finding(
            _at("budget", "warningThreshold"),
            f"warningThreshold is a fraction of the budget in (0, 1], e.g. 0.8 (got {budget.warning_threshold:g})",
        )


@rule
def region_is_allowed(profile: SandboxProfile) -> Iterator[Finding]:
    identity = profile.spec.identity
    region = profile.spec.runtime.region
    if identity is not None and region not in identity.allowed_regions:
        yield Finding(
            _at("runtime", "region"),
            f"region {region} is not in identity.allowedRegions ({', '.join(identity.allowed_regions)}); "
            f"add it there or pick one of them",
        )


@rule
def role_session_duration_in_iam_bounds(profile: SandboxProfile) -> Iterator[Finding]:
    identity = profile.spec.identity
    if identity is None:
        return
    low, high = ROLE_SESSION_BOUNDS_SECONDS
    if not low <= parse_duration(identity.role_session_duration) <= high:
        yield Finding(
            _at("identity", "roleSessionDuration"),
            f"IAM role sessions last 1h to 12h (got {identity.role_session_duration})",
        )


@rule
def volume_mount_points_are_free(profile: SandboxProfile) -> Iterator[Finding]:
    runtime, execution = profile.spec.runtime, profile.spec.execution
    volume = runtime.additional_volume
    if volume is not None:
        taken = {point: "a system path" for point in RESERVED_MOUNT_POINTS}
        taken[execution.working_dir.rstrip("/")] = "execution.workingDir"
        if runtime.mount_efs:
            taken[runtime.efs_mount_point.rstrip("/")] = "runtime.efsMountPoint"
        mount_point = volume.mount_point.rstrip("/") or "/"
        if mount_point in taken:
            yield Finding(
                _at("runtime", "additionalVolume", "mountPoint"),
                f"{volume.mount_point} is {taken[mount_point]}; mount the volume somewhere else, e.g. /data",
            )
    if runtime.mount_efs:
        efs_point = runtime.efs_mount_point.rstrip("/") or "/"
        if efs_point in RESERVED_MOUNT_POINTS or efs_point == execution.working_dir.rstrip("/"):
            yield Finding(
                _at("runtime", "efsMountPoint"),
                f"{runtime.efs_mount_point} is a system path or the workingDir; mount EFS somewhere else, e.g. /shared",
            )


@rule
def slack_settings_are_consistent(profile: SandboxProfile) -> Iterator[Finding]:
    cli = profile.spec.cli
    if cli.notify_slack_per_sandbox and cli.notify_slack_channel_override:
        yield Finding(
            _at("cli", "notifySlackChannelOverride"),
            "a channel override and per-sandbox channels exclude each other; keep one",
        )
    for flag, enabled in (
        ("notifySlackInboundEnabled", cli.notify_slack_inbound_enabled),
        ("notifySlackTranscriptEnabled", cli.notify_slack_transcript_enabled),
    ):
        if enabled and not (cli.notify_slack_enabled and cli.notify_slack_per_sandbox):
            yield Finding(_at("cli", flag), f"{flag} needs notifySlackEnabled: true and notifySlackPerSandbox: true")


def warnings_for(profile: SandboxProfile) -> list[Finding]:
    """Legal but probably unintended settings; reported, never fatal."""
    spec = profile.spec
    found: list[Finding] = []
    if spec.source_access.mode == "none" and spec.source_access.github is not None:
        found.append(Finding(_at("sourceAccess", "mode"), "github settings are ignored while mode is none", severity="warning"))
    github = spec.source_access.github
    if spec.source_access.mode == "allowlist" and (github is None or not github.allowed_repos):
        found.append(
            Finding(
                _at("sourceAccess", "github", "allowedRepos"),
                "mode allowlist with no repositories denies every repository",
                severity="warning",
            )
        )
    if "*" in spec.network.egress.allowed_dns_suffixes:
        found.append(
            Finding(
                _at("network", "egress", "allowedDNSSuffixes"),
                "'*' allows every name: egress by name is open",
                severity="warning",
            )
        )
    capture = spec.observability.tls_capture
    if capture.enabled and "openssl" not in capture.libraries:
        found.append(
            Finding(
                _at("observability", "tlsCapture", "libraries"),
                "openssl is required: it is the only library capture hooks today; add it to the list",
            )
        )
    for index, library in enumerate(capture.libraries):
        if library != "openssl":
            found.append(
                Finding(
                    _at("observability", "tlsCapture", "libraries", index),
                    f"{library} capture is not supported yet; only openssl is hooked, so {library} traffic is not captured",
                    severity="warning",
                )
            )
    return found
