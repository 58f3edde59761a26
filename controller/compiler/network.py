"""The sandbox's security group: the coarse outer fence around the on-box DNS-name gate.

Names cannot be expressed in a security group, so it allows only the ports the sandbox can need
(HTTPS, DNS to the VPC resolver, NFS to EFS, and the profile's own CIDRs) and no ingress; the host
agent decides which names.
Destinations that depend on the VPC (`vpc-resolver`, `efs`) are symbolic and resolved at create.
"""

from __future__ import annotations

from controller.profile import SandboxProfile


def security_group_egress(profile: SandboxProfile) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = [
        {"protocol": "tcp", "port": 443, "to": "0.0.0.0/0", "description": "HTTPS; names are gated on the box"},
        {"protocol": "udp", "port": 53, "to": "vpc-resolver", "description": "DNS to the VPC resolver only"},
        {"protocol": "tcp", "port": 53, "to": "vpc-resolver", "description": "DNS over TCP to the VPC resolver only"},
    ]
    for cidr in profile.spec.network.egress.allowed_cidrs:
        rules.append({"protocol": "all", "port": None, "to": cidr, "description": "allowedCIDRs entry"})
    if profile.spec.runtime.mount_efs:
        rules.append({"protocol": "tcp", "port": 2049, "to": "efs", "description": "NFS to the EFS mount targets"})
    return rules
