"""The security group: HTTPS anywhere, DNS to the VPC resolver, NFS only with EFS, declared CIDRs, no ingress."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from controller.compiler.network import security_group_egress
from controller.profile import BUILTIN_PROFILES_DIR, load_profile
from controller.profile.catalog import builtin_profiles
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
CREATABLE = [entry.name for entry in builtin_profiles() if not entry.abstract]


def with_network(mount_efs: bool, cidrs: list[str]) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        spec["runtime"]["mountEFS"] = mount_efs
        if cidrs:
            spec["network"]["egress"]["allowedCIDRs"] = cidrs

    return edit


def rules_to(rules: list[dict[str, Any]], destination: str) -> list[tuple[Any, Any]]:
    return sorted(((rule["protocol"], rule["port"]) for rule in rules if rule["to"] == destination), key=repr)


@pytest.mark.parametrize(
    ("mount_efs", "cidrs"),
    [
        (False, []),
        (True, []),
        (False, ["10.20.0.0/16"]),
        (True, ["10.20.0.0/16", "192.168.7.0/24", "2001:db8::/32"]),
    ],
)
def test_security_group_egress(tmp_path: Path, mount_efs: bool, cidrs: list[str]) -> None:
    rules = security_group_egress(goose_variant(tmp_path, with_network(mount_efs, cidrs)))
    assert rules_to(rules, "0.0.0.0/0") == [("tcp", 443)]
    assert rules_to(rules, "vpc-resolver") == [("tcp", 53), ("udp", 53)]
    nfs = [rule for rule in rules if rule["port"] == 2049]
    if mount_efs:
        assert [(rule["protocol"], rule["to"]) for rule in nfs] == [("tcp", "efs")]
    else:
        assert nfs == []
        assert rules_to(rules, "efs") == []
    for cidr in cidrs:
        assert len([rule for rule in rules if rule["to"] == cidr]) == 1, cidr
    # Nothing else: HTTPS, two DNS rules, NFS with EFS, one rule per CIDR.
    assert len(rules) == 3 + len(cidrs) + (1 if mount_efs else 0)
    # DNS goes nowhere but the resolver.
    assert all(rule["to"] == "vpc-resolver" for rule in rules if rule["port"] == 53)
    assert all(isinstance(rule["description"], str) and rule["description"] for rule in rules)


def test_cidr_rules_keep_the_profile_order(tmp_path: Path) -> None:
    cidrs = ["192.168.7.0/24", "10.20.0.0/16", "2001:db8::/32"]
    rules = security_group_egress(goose_variant(tmp_path, with_network(False, cidrs)))
    assert [rule["to"] for rule in rules if rule["to"] in cidrs] == cidrs


def test_plan_has_no_ingress_at_all(tmp_path: Path) -> None:
    compiled = compile_profile(goose_variant(tmp_path, with_network(True, ["10.20.0.0/16"])))
    assert list(compiled.plan["securityGroup"]) == ["egress"]
    assert "ingress" not in str(compiled.plan["securityGroup"]).lower()


@pytest.mark.parametrize("name", CREATABLE)
def test_every_builtin_profile_gets_the_fence(name: str) -> None:
    profile, _ = load_profile(name)
    rules = compile_profile(profile).plan["securityGroup"]["egress"]
    assert rules_to(rules, "0.0.0.0/0") == [("tcp", 443)]
    assert rules_to(rules, "vpc-resolver") == [("tcp", 53), ("udp", 53)]
    assert bool(rules_to(rules, "efs")) == profile.spec.runtime.mount_efs
