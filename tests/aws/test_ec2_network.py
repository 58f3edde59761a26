"""Where a sandbox sits and its security group: no ingress, egress exactly as the plan says (the VPC resolver
and EFS resolved for the VPC), found by tag, drift repaired, and a clear error when there is no VPC to use."""

from __future__ import annotations

import ipaddress

import pytest

from controller.substrates.ec2 import (
    Ec2Error,
    Vpc,
    delete_security_group,
    ec2_plan,
    ensure_security_group,
    find_subnets,
    find_vpc,
)
from controller.substrates.ec2.network import EgressRule, desired_egress, egress_changes, rules_from_permissions
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import FAST, SANDBOX_ID, aws_calls, compiled, operator_config, reads, sandbox_tags, writes

VPC = Vpc("vpc-1", ("10.20.0.0/16", "100.64.0.0/20"))
GOOSE_EGRESS = ec2_plan(compiled().plan).egress


def permissions(moto: Moto, group_id: str) -> tuple[list[dict[str, object]], list[tuple[object, ...]]]:
    """(ingress, egress as sorted (protocol, from, to, cidr, description) tuples) as EC2 reports them."""
    group = moto.client("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    egress = sorted(
        (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), r["CidrIp"], r.get("Description"))
        for p in group["IpPermissionsEgress"]
        for r in p["IpRanges"]
    )
    assert all(not p["Ipv6Ranges"] and not p["UserIdGroupPairs"] and not p["PrefixListIds"] for p in group["IpPermissionsEgress"])
    return group["IpPermissions"], egress


# ---- pure: the wanted rules and the diff -----------------------------------------------------------


def test_the_resolver_is_the_primary_blocks_base_plus_two() -> None:
    assert VPC.resolver == "10.20.0.2"
    assert Vpc("vpc-2", ("172.31.0.0/16",)).resolver == "172.31.0.2"


def test_goose_egress_is_https_anywhere_dns_to_the_resolver_and_nfs_to_the_vpc() -> None:
    wanted = sorted(desired_egress(GOOSE_EGRESS, VPC))

    assert [(r.protocol, r.from_port, r.to_port, r.peer) for r in wanted] == [
        ("tcp", 53, 53, "10.20.0.2/32"),
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("tcp", 2049, 2049, "10.20.0.0/16"),  # EFS mount targets live in the VPC's blocks
        ("tcp", 2049, 2049, "100.64.0.0/20"),
        ("udp", 53, 53, "10.20.0.2/32"),
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"protocol": "all", "port": None, "to": "192.0.2.0/24"}, EgressRule("-1", None, None, "ipv4", "192.0.2.0/24")),
        ({"protocol": "all", "port": None, "to": "2001:db8::/32"}, EgressRule("-1", None, None, "ipv6", "2001:db8::/32")),
        ({"protocol": "udp", "port": 123, "to": "0.0.0.0/0"}, EgressRule("udp", 123, 123, "ipv4", "0.0.0.0/0")),
    ],
)
def test_allowed_cidrs_and_other_rules(rule: dict[str, object], expected: EgressRule) -> None:
    assert desired_egress([rule], VPC) == {expected}


def test_rules_read_back_from_ec2_match_the_wanted_ones_whatever_their_descriptions() -> None:
    described = [
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "edited"}]},
        {"IpProtocol": "-1", "IpRanges": [], "Ipv6Ranges": [{"CidrIpv6": "::/0"}], "PrefixListIds": [{"PrefixListId": "pl-1"}]},
        {"IpProtocol": "6", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [{"GroupId": "sg-9"}]},
    ]
    current = rules_from_permissions(described)
    wanted = {EgressRule("tcp", 443, 443, "ipv4", "0.0.0.0/0", "HTTPS")}

    revoke, authorize = egress_changes(wanted, current)

    assert authorize == []
    assert revoke == [
        EgressRule("-1", None, None, "ipv6", "::/0"),
        EgressRule("-1", None, None, "prefix-list", "pl-1"),
        EgressRule("tcp", 22, 22, "group", "sg-9"),
    ]
    assert revoke[2].permission() == {
        "IpProtocol": "tcp",
        "FromPort": 22,
        "ToPort": 22,
        "UserIdGroupPairs": [{"GroupId": "sg-9"}],
    }


def test_descriptions_keep_to_the_characters_ec2_accepts() -> None:
    rule = EgressRule("tcp", 443, 443, "ipv4", "0.0.0.0/0", "it's <HTTPS>; gated")

    assert rule.permission()["IpRanges"] == [{"CidrIp": "0.0.0.0/0", "Description": "it s  HTTPS ; gated"}]
    assert rule.permission(with_description=False)["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]


# ---- VPC and subnets ----------------------------------------------------------------------------


def test_the_default_vpc_and_its_default_subnets_by_zone(moto: Moto) -> None:
    config = operator_config()

    vpc = find_vpc(REGION, config)
    subnets = find_subnets(REGION, vpc, config)

    described = moto.client("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    assert (vpc.vpc_id, vpc.cidr_blocks, vpc.is_default) == (described["VpcId"], (described["CidrBlock"],), True)
    assert vpc.resolver == str(ipaddress.ip_network(described["CidrBlock"]).network_address + 2)
    zones = [subnet.availability_zone for subnet in subnets]
    assert zones == sorted(zones) and len(zones) == len(set(zones)) > 1


def test_the_operators_vpc_and_subnets_in_their_order(moto: Moto) -> None:
    ec2 = moto.client("ec2")
    vpc_id = ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
    first = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.8.1.0/24", AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
    second = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.8.2.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    config = operator_config(vpc_id=vpc_id, subnet_ids=[first, second])

    vpc = find_vpc(REGION, config)

    assert (vpc.vpc_id, vpc.resolver, vpc.is_default) == (vpc_id, "10.8.0.2", False)
    assert [s.subnet_id for s in find_subnets(REGION, vpc, config)] == [first, second]
    assert {s.subnet_id for s in find_subnets(REGION, vpc, operator_config(vpc_id=vpc_id))} == {first, second}


def test_subnets_outside_the_vpc_are_refused(moto: Moto) -> None:
    ec2 = moto.client("ec2")
    vpc_id = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    stray = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    config = operator_config(subnet_ids=[stray])  # no vpc_id: the default VPC

    with pytest.raises(Ec2Error, match=f"{stray} not in vpc-.*; set vpc_id to their VPC"):
        find_subnets(REGION, find_vpc(REGION, config), config)


def test_a_missing_vpc_id_names_the_setting(moto: Moto) -> None:
    with pytest.raises(Ec2Error, match="vpc_id vpc-0123456789abcdef0 .* does not exist in us-east-1"):
        find_vpc(REGION, operator_config(vpc_id="vpc-0123456789abcdef0"))


def test_no_default_vpc_says_how_to_fix_it(moto: Moto) -> None:
    ec2 = moto.client("ec2")
    default = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    for subnet in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [default]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    for gateway in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [default]}])[
        "InternetGateways"
    ]:
        ec2.detach_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"], VpcId=default)
    ec2.delete_vpc(VpcId=default)

    with pytest.raises(Ec2Error) as raised:
        find_vpc(REGION, operator_config())
    assert "us-east-1 has no default VPC: set vpc_id and subnet_ids" in str(raised.value)
    assert "aws ec2 create-default-vpc --region us-east-1" in str(raised.value)


# ---- the security group ----------------------------------------------------------------------------


def test_goose_group_has_no_ingress_and_exactly_the_planned_egress(moto: Moto) -> None:
    goose = compiled()
    vpc = find_vpc(REGION, operator_config())

    group_id = ensure_security_group(REGION, sandbox_tags(goose), vpc, GOOSE_EGRESS)

    ingress, egress = permissions(moto, group_id)
    resolver, block = f"{vpc.resolver}/32", vpc.cidr_blocks[0]
    assert ingress == []
    assert egress == [
        ("tcp", 53, 53, resolver, "DNS over TCP to the VPC resolver only"),
        ("tcp", 443, 443, "0.0.0.0/0", "HTTPS; names are gated on the box"),
        ("tcp", 2049, 2049, block, "NFS to the EFS mount targets"),
        ("udp", 53, 53, resolver, "DNS to the VPC resolver only"),
    ]  # the default allow-all is gone
    group = moto.client("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert group["GroupName"] == f"km-{SANDBOX_ID}" and group["VpcId"] == vpc.vpc_id
    assert {t["Key"]: t["Value"] for t in group["Tags"]} == {
        "km:sandbox-id": SANDBOX_ID,
        "km:profile": "goose",
        "km:plan-hash": goose.hash,
        "km:resource-prefix": "km",
        "Name": f"km-{SANDBOX_ID}",
    }


def test_a_second_run_finds_the_group_and_changes_nothing(moto: Moto) -> None:
    tags, vpc = sandbox_tags(compiled()), find_vpc(REGION, operator_config())
    group_id = ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS)

    with aws_calls() as calls:
        again = ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS)

    assert again == group_id
    assert reads(calls) == {"ec2.DescribeSecurityGroups": 1} and writes(calls) == {}
    assert (
        len(
            moto.client("ec2").describe_security_groups(Filters=[{"Name": "group-name", "Values": [tags.name]}])["SecurityGroups"]
        )
        == 1
    )


def test_drift_is_repaired(moto: Moto) -> None:
    tags, vpc = sandbox_tags(compiled()), find_vpc(REGION, operator_config())
    group_id = ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS)
    _, planned = permissions(moto, group_id)
    ec2 = moto.client("ec2")
    ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    ec2.authorize_security_group_egress(
        GroupId=group_id, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    ec2.revoke_security_group_egress(
        GroupId=group_id,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    ec2.create_tags(Resources=[group_id], Tags=[{"Key": "km:plan-hash", "Value": "stale"}])

    assert ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS) == group_id

    assert permissions(moto, group_id) == ([], planned)
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["km:plan-hash"] == tags.plan_hash


def test_a_changed_plan_changes_only_the_difference(moto: Moto) -> None:
    tags, vpc = sandbox_tags(compiled()), find_vpc(REGION, operator_config())
    group_id = ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS)
    without_efs = [rule for rule in GOOSE_EGRESS if rule["to"] != "efs"] + [
        {"protocol": "all", "port": None, "to": "192.0.2.0/24"}
    ]

    with aws_calls() as calls:
        ensure_security_group(REGION, tags, vpc, without_efs)

    assert writes(calls) == {"ec2.RevokeSecurityGroupEgress": 1, "ec2.AuthorizeSecurityGroupEgress": 1}
    _, egress = permissions(moto, group_id)
    assert [rule[:4] for rule in egress] == [
        ("-1", None, None, "192.0.2.0/24"),
        ("tcp", 53, 53, f"{vpc.resolver}/32"),
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("udp", 53, 53, f"{vpc.resolver}/32"),
    ]


def test_a_group_with_the_name_but_not_the_tags_is_left_alone(moto: Moto) -> None:
    tags, vpc = sandbox_tags(compiled()), find_vpc(REGION, operator_config())
    moto.client("ec2").create_security_group(GroupName=tags.name, Description="someone else's", VpcId=vpc.vpc_id)

    with pytest.raises(
        Ec2Error, match=f"a security group named {tags.name} already exists in vpc-.* \\(tagged for no sandbox\\)"
    ):
        ensure_security_group(REGION, tags, vpc, GOOSE_EGRESS)


def test_delete_tolerates_a_group_already_gone(moto: Moto) -> None:
    group_id = ensure_security_group(REGION, sandbox_tags(compiled()), find_vpc(REGION, operator_config()), GOOSE_EGRESS)

    assert delete_security_group(REGION, group_id, FAST) is True
    assert delete_security_group(REGION, group_id, FAST) is False
    assert not moto.client("ec2").describe_security_groups(Filters=[{"Name": "group-id", "Values": [group_id]}])["SecurityGroups"]
