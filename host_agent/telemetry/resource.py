"""The OpenTelemetry resource that names this sandbox on everything the host agent exports.

Operators filter telemetry from many sandboxes by these attributes, so the daemon's own signals and the
agent's forwarded ones (see `receiver`) carry the same set.
"""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource

SERVICE_NAME = "km-host-agent"


def sandbox_attributes(sandbox_id: str, profile: str, region: str | None) -> dict[str, str]:
    """The km attributes without `service.name`: what the receiver adds to an agent's own resource."""
    attributes = {"km.sandbox.id": sandbox_id, "km.profile": profile}
    if region is not None:
        attributes["cloud.region"] = region
    return attributes


def sandbox_resource(sandbox_id: str, profile: str, region: str | None) -> Resource:
    """The host agent's resource; `cloud.region` is left out when the sandbox has none (local substrate)."""
    # Resource(...) rather than Resource.create(...): create() would merge in OTEL_RESOURCE_ATTRIBUTES and the
    # SDK's telemetry.sdk.* defaults from the daemon's environment, and the attribute set should be exactly ours.
    return Resource({"service.name": SERVICE_NAME, **sandbox_attributes(sandbox_id, profile, region)})
