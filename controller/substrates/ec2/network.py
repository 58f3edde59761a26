"""Where a sandbox sits on the network, and its security group: no ingress, egress exactly as planned.

The security group is the coarse outer fence; names are gated on the box. The compiler's rules name
some destinations symbolically (`vpc-resolver`, `efs`) because they depend on the VPC; they are resolved
here. Convergence is a pure diff of wanted against present rules, so a re-run repairs drift (a rule
added or removed by hand) without duplicates.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controller.aws.clients import client
from controller.aws.config import OperatorConfig
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, aws_message, is_aws_error
from controller.substrates.ec2.polling import Polling, wait_for
from controller.substrates.ec2.tags import SandboxRef, SandboxTags, find_by_tag, tag_dict, tags_differ

PeerKind = Literal["ipv4", "ipv6", "prefix-list", "group"]
ALL_PROTOCOLS = "-1"
_PROTOCOL_NAMES = {"6": "tcp", "17": "udp", "1": "icmp", "all": ALL_PROTOCOLS, "-1": ALL_PROTOCOLS}
SG_DELETE_POLLING = Polling(interval_seconds=5.0, timeout_seconds=180.0)
# EC2 accepts only these characters in a rule's description.
_RULE_DESCRIPTION_UNSAFE = re.compile(r"[^a-zA-Z0-9 ._\-:/()#,@\[\]+=&;{}!$*]")


@dataclass(frozen=True)
class Vpc:
    vpc_id: str
    cidr_blocks: tuple[str, ...]  # the primary block first
    is_default: bool = False

    @property
    def resolver(self) -> str:
        """The Amazon-provided DNS server: the primary block's base address plus two."""
        return str(ipaddress.ip_network(self.cidr_blocks[0]).network_address + 2)


@dataclass(frozen=True)
class Subnet:
    subnet_id: str
    availability_zone: str


@dataclass(frozen=True, order=True)
class EgressRule:
    """One protocol/port range to one peer; the description is carried but is not part of its identity."""

    protocol: str
    from_port: int | None
    to_port: int | None
    peer_kind: PeerKind
    peer: str
    description: str = field(default="", compare=False)

    def permission(self, with_description: bool = True) -> dict[str, Any]:
        """The rule as one entry of EC2's IpPermissions (a revoke matches without the description)."""
        entry: dict[str, Any] = {"IpProtocol": self.protocol}
        if self.from_port is not None:
            entry |= {"FromPort": self.from_port, "ToPort": self.to_port}
        text = _RULE_DESCRIPTION_UNSAFE.sub(" ", self.description)[:255] if with_description else ""
        described = {"Description": text} if text else {}
        if self.peer_kind == "ipv4":
            entry["IpRanges"] = [{"CidrIp": self.peer, **described}]
        elif self.peer_kind == "ipv6":
            entry["Ipv6Ranges"] = [{"CidrIpv6": self.peer, **described}]
        elif self.peer_kind == "prefix-list":
            entry["PrefixListIds"] = [{"PrefixListId": self.peer, **described}]
        else:
            entry["UserIdGroupPairs"] = [{"GroupId": self.peer, **described}]
        return entry


# ---- VPC and subnets -------------------------------------------------------------------------


def find_vpc(region: str, config: OperatorConfig) -> Vpc:
    """The operator's `vpc_id`, else the region's default VPC (one DescribeVpcs call)."""
    ec2 = client("ec2", region)
    if config.vpc_id:
        try:
            found = ec2.describe_vpcs(VpcIds=[config.vpc_id])["Vpcs"]
        except Exception as error:
            if not is_aws_error(error, "InvalidVpcID.NotFound"):
                raise
            found = []
        if not found:
            raise Ec2Error(
                f"vpc_id {config.vpc_id} (km configuration) does not exist in {region}; "
                f"correct it, or remove it to use the default VPC"
            )
    else:
        found = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not found:
            raise Ec2Error(
                f"{region} has no default VPC: set vpc_id and subnet_ids in the km configuration (or KM_VPC_ID and "
                f"KM_SUBNET_IDS), or create one with `aws ec2 create-default-vpc --region {region}`"
            )
    vpc = found[0]
    primary = vpc["CidrBlock"]
    others = [
        association["CidrBlock"]
        for association in vpc.get("CidrBlockAssociationSet", [])
        if association.get("CidrBlockState", {}).get("State") == "associated" and association["CidrBlock"] != primary
    ]
    return Vpc(vpc["VpcId"], (primary, *others), bool(vpc.get("IsDefault")))


def find_subnets(region: str, vpc: Vpc, config: OperatorConfig) -> list[Subnet]:
    """The operator's `subnet_ids` in their order, else the VPC's (default-for-AZ) subnets by zone."""
    ec2 = client("ec2", region)
    if config.subnet_ids:
        try:
            found = ec2.describe_subnets(SubnetIds=list(config.subnet_ids))["Subnets"]
        except Exception as error:
            if is_aws_error(error, "InvalidSubnetID.NotFound"):
                raise Ec2Error(f"subnet_ids (km configuration): {aws_message(error)}; list subnets of {vpc.vpc_id}") from None
            raise
        strays = sorted(subnet["SubnetId"] for subnet in found if subnet["VpcId"] != vpc.vpc_id)
        if strays:
            raise Ec2Error(
                f"subnet_ids (km configuration): {', '.join(strays)} not in {vpc.vpc_id}; "
                f"set vpc_id to their VPC, or list subnets of {vpc.vpc_id}"
            )
        by_id = {subnet["SubnetId"]: subnet for subnet in found}
        return [Subnet(subnet_id, by_id[subnet_id]["AvailabilityZone"]) for subnet_id in config.subnet_ids]
    filters = [{"Name": "vpc-id", "Values": [vpc.vpc_id]}]
    if vpc.is_default:
        filters.append({"Name": "default-for-az", "Values": ["true"]})
    found = ec2.describe_subnets(Filters=filters)["Subnets"]
    if not found:
        raise Ec2Error(f"{vpc.vpc_id} has no subnets km can use; set subnet_ids in the km configuration")
    return sorted(
        (Subnet(subnet["SubnetId"], subnet["AvailabilityZone"]) for subnet in found),
        key=lambda s: (s.availability_zone, s.subnet_id),
    )


# ---- egress rules: pure --------------------------------------------------------------------


def desired_egress(rules: Iterable[Mapping[str, Any]], vpc: Vpc) -> set[EgressRule]:
    """The compiler's rules with `vpc-resolver` and `efs` resolved for `vpc` (EFS mount targets live in its blocks)."""
    wanted: set[EgressRule] = set()
    for rule in rules:
        protocol = _protocol(str(rule["protocol"]))
        port = None if protocol == ALL_PROTOCOLS or rule.get("port") is None else int(rule["port"])
        destination = str(rule["to"])
        if destination == "vpc-resolver":
            peers = [f"{vpc.resolver}/32"]
        elif destination == "efs":
            peers = list(vpc.cidr_blocks)
        else:
            peers = [destination]
        for peer in peers:
            kind: PeerKind = "ipv6" if ":" in peer else "ipv4"
            wanted.add(EgressRule(protocol, port, port, kind, peer, str(rule.get("description", ""))))
    return wanted


def rules_from_permissions(permissions: Iterable[Mapping[str, Any]]) -> set[EgressRule]:
    """EC2's IpPermissions (as DescribeSecurityGroups returns them) as one rule per peer."""
    rules: set[EgressRule] = set()
    for permission in permissions:
        protocol = _protocol(str(permission["IpProtocol"]))
        every_port = protocol == ALL_PROTOCOLS
        from_port, to_port = (None, None) if every_port else (permission.get("FromPort"), permission.get("ToPort"))
        peers: list[tuple[PeerKind, str, str]] = [
            *(("ipv4", entry["CidrIp"], entry.get("Description", "")) for entry in permission.get("IpRanges", [])),
            *(("ipv6", entry["CidrIpv6"], entry.get("Description", "")) for entry in permission.get("Ipv6Ranges", [])),
            *(
                ("prefix-list", entry["PrefixListId"], entry.get("Description", ""))
                for entry in permission.get("PrefixListIds", [])
            ),
            *(("group", entry["GroupId"], entry.get("Description", "")) for entry in permission.get("UserIdGroupPairs", [])),
        ]
        for kind, peer, description in peers:
            rules.add(EgressRule(protocol, from_port, to_port, kind, peer, description))
    return rules


def egress_changes(desired: set[EgressRule], current: set[EgressRule]) -> tuple[list[EgressRule], list[EgressRule]]:
    """(to revoke, to authorize), each sorted: what makes `current` equal `desired`."""
    return sorted(current - desired), sorted(desired - current)


def _protocol(name: str) -> str:
    return _PROTOCOL_NAMES.get(name.lower(), name.lower())


# ---- the security group --------------------------------------------------------------------


def ensure_security_group(region: str, tags: SandboxTags, vpc: Vpc, egress: Iterable[Mapping[str, Any]]) -> str:
    """The sandbox's security group `<prefix>-<sandbox_id>` in `vpc`, with no ingress and exactly the planned egress.

    Found by tag first; a re-run revokes what is not planned (the default allow-all egress included),
    authorizes what is missing and refreshes the tags. Returns the group id.
    """
    ec2 = client("ec2", region)
    group = _pick(find_by_tag(ec2, "security-groups", tags), tags.name)
    if group is None:
        group = _create_group(ec2, tags, vpc)
    elif group["VpcId"] != vpc.vpc_id:
        raise Ec2Error(
            f"security group {group['GroupId']} of {tags.sandbox_id} is in {group['VpcId']}, "
            f"not {vpc.vpc_id} (km configuration); destroy the sandbox and create it again"
        )
    group_id = str(group["GroupId"])
    what = f"security group {group_id} of {tags.sandbox_id}"
    try:
        if tags_differ(group.get("Tags"), tags.tags()):
            ec2.create_tags(Resources=[group_id], Tags=tags.tags())
        ingress = sorted(rules_from_permissions(group.get("IpPermissions", [])))
        if ingress:
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[rule.permission(False) for rule in ingress])
        revoke, authorize = egress_changes(
            desired_egress(egress, vpc), rules_from_permissions(group.get("IpPermissionsEgress", []))
        )
        if revoke:
            ec2.revoke_security_group_egress(GroupId=group_id, IpPermissions=[rule.permission(False) for rule in revoke])
        if authorize:
            ec2.authorize_security_group_egress(GroupId=group_id, IpPermissions=[rule.permission() for rule in authorize])
    except Exception as error:
        if not is_aws_error(error):
            raise
        raise as_ec2_error(error, f"converging {what}") from None
    return group_id


def delete_security_group(region: str, group_id: str, polling: Polling = SG_DELETE_POLLING) -> bool:
    """Delete a group, retrying while AWS still counts it in use (a terminated instance's interface lingers).

    False when it was already gone.
    """
    ec2 = client("ec2", region)

    def attempt() -> bool | None:
        try:
            ec2.delete_security_group(GroupId=group_id)
        except Exception as error:
            if is_aws_error(error, "InvalidGroup.NotFound", "InvalidGroupId.NotFound"):
                return False
            if is_aws_error(error, "DependencyViolation"):
                return None
            raise
        return True

    return wait_for(attempt, f"security group {group_id} to be released by its instance", polling)


def _pick(groups: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The group named `name` among those tagged for the sandbox, else the first of them."""
    named = [group for group in groups if group.get("GroupName") == name]
    candidates = named or groups
    return candidates[0] if candidates else None


def _create_group(ec2: Any, tags: SandboxTags, vpc: Vpc) -> dict[str, Any]:
    try:
        created = ec2.create_security_group(
            GroupName=tags.name,
            Description=f"km sandbox {tags.sandbox_id}: no ingress; egress as its plan allows",
            VpcId=vpc.vpc_id,
            TagSpecifications=tags.tag_specifications("security-group"),
        )
        group_id = created["GroupId"]
    except Exception as error:
        if not is_aws_error(error, "InvalidGroup.Duplicate"):
            if is_aws_error(error):
                raise as_ec2_error(error, f"creating security group {tags.name}") from None
            raise
        # Same name, but not found by tag: something else made it; km does not take it over.
        found = ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [tags.name]}, {"Name": "vpc-id", "Values": [vpc.vpc_id]}]
        )["SecurityGroups"]
        owner = tag_dict(found[0].get("Tags")).get("km:sandbox-id") if found else None
        raise Ec2Error(
            f"a security group named {tags.name} already exists in {vpc.vpc_id} (tagged for {owner or 'no sandbox'}); "
            f"delete it, or use another resource_prefix"
        ) from None
    # A new group starts with AWS's default egress (allow all); read it back rather than assume its shape.
    return dict(ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0])


def find_security_group_ids(region: str, ref: SandboxRef) -> list[str]:
    return [str(group["GroupId"]) for group in find_by_tag(client("ec2", region), "security-groups", ref)]
