"""The host's nftables rules for a sandbox link and the sysctl changes for IPv6 forwarding (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from controller.substrates.local.host_rules import (
    Rule,
    accept_ra_fixes,
    host_dns_upstreams,
    link_rules,
    parse_upstream,
    sandbox_dns_upstream,
    table_script,
)


def chains(rules: list[Rule]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for rule in rules:
        found.setdefault(f"{rule.family} {rule.table} {rule.chain}", []).append(rule.expression)
    return found


def test_a_link_gets_replies_only_in_every_direction_and_nat_in_both_families() -> None:
    rules = chains(link_rules("kmv-0123abcd", "10.213.0.6", "fd6b:6d00:0:1::2"))
    link = '"kmv-0123abcd"'
    assert rules == {
        "ip km postrouting": [f"ip saddr 10.213.0.6 oifname != {link} masquerade"],
        "inet km postrouting": [f"ip6 saddr fd6b:6d00:0:1::2 oifname != {link} masquerade"],
        "inet km forward": [f"oifname {link} ct state established,related accept", f"oifname {link} drop"],
        "inet km output": [
            f"oifname {link} ct state established,related accept",
            f"oifname {link} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept",
            f"oifname {link} drop",
        ],
        "inet km input": [
            f"iifname {link} ct state established,related accept",
            f"iifname {link} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept",
            f"iifname {link} drop",
        ],
    }


def test_without_ipv6_there_is_no_nat66() -> None:
    assert not any("ip6 saddr" in rule.expression for rule in link_rules("kmv-x", "10.213.0.6", None))


def test_a_host_local_dns_upstream_is_let_in_before_the_drop() -> None:
    rules = chains(link_rules("kmv-x", "10.213.0.6", None, [("192.0.2.2", 53), ("fd00::2", 5353)]))["inet km input"]
    assert rules[-1] == 'iifname "kmv-x" drop'
    assert 'iifname "kmv-x" ip daddr 192.0.2.2 udp dport 53 accept' in rules
    assert 'iifname "kmv-x" ip daddr 192.0.2.2 tcp dport 53 accept' in rules
    assert 'iifname "kmv-x" ip6 daddr fd00::2 udp dport 5353 accept' in rules


def test_rules_carry_the_sandbox_id() -> None:
    rule = Rule("inet", "km", "forward", 'oifname "kmv-x" drop')
    assert rule.add_command("sb-0123abcd") == 'add rule inet km forward oifname "kmv-x" drop comment "km:sb-0123abcd"'


def test_the_table_script_declares_every_base_chain() -> None:
    script = table_script()
    assert script.startswith("table inet km {")
    for hook in ("postrouting priority srcnat", "forward priority filter", "input priority filter", "output priority filter"):
        assert hook in script


@pytest.mark.parametrize(
    ("upstreams", "expected"),
    [
        ([("192.0.2.2", 53)], [("192.0.2.2", 53)]),  # a resolver on the host's own address
        ([("10.255.255.53", 53)], []),  # elsewhere: reached through the forward path
        ([("127.0.0.53", 53)], []),  # loopback is the sandbox's own from inside
        ([("fd00::2", 53)], [("fd00::2", 53)]),
    ],
)
def test_host_dns_upstreams(upstreams: list[tuple[str, int]], expected: list[tuple[str, int]]) -> None:
    host = [ipaddress.ip_address(a) for a in ("127.0.0.1", "192.0.2.2", "fd00::2", "::1")]
    assert host_dns_upstreams(upstreams, host) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.19.7.2", ("198.19.7.2", 53)),
        ("198.19.7.2:5353", ("198.19.7.2", 5353)),
        ("[2001:db8:7::2]:53", ("2001:db8:7::2", 53)),
        ("2001:db8:7::2", ("2001:db8:7::2", 53)),
        ("fe80::1%eth0", ("fe80::1", 53)),
        ("resolver.example", None),
    ],
)
def test_parse_upstream(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_upstream(text) == expected


def test_the_upstream_is_the_configured_one_else_resolv_confs_first() -> None:
    resolv = "# generated\nsearch example\nnameserver 10.255.255.53\nnameserver 192.0.2.1\n"
    assert sandbox_dns_upstream("198.19.7.2:53", resolv) == ("198.19.7.2", 53)
    assert sandbox_dns_upstream(None, resolv) == ("10.255.255.53", 53)
    assert sandbox_dns_upstream(None, "") is None
    # resolved's stub on the host is the sandbox's own loopback inside it: the next server is the one
    assert sandbox_dns_upstream(None, "nameserver 127.0.0.53\nnameserver 192.0.2.53\n") == ("192.0.2.53", 53)
    assert sandbox_dns_upstream(None, "nameserver 127.0.0.53\n") is None


@pytest.mark.parametrize(
    ("current", "fixes"),
    [
        ({"all": 1, "default": 1, "eth0": 1, "lo": 1}, {"all": 2, "default": 2, "eth0": 2, "lo": 2}),
        ({"eth0": 2, "kmv-x": 0, "wlan0": 1}, {"wlan0": 2}),
        ({"eth0": 0}, {}),
    ],
)
def test_accept_ra_1_becomes_2_before_forwarding(current: dict[str, int], fixes: dict[str, int]) -> None:
    assert accept_ra_fixes(current) == fixes
