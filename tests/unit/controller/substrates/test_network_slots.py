"""Choosing a local sandbox's network slot from what the host shows (facts in, slot out; no root needed).

The facts are `ip -j addr` and `ip -j route show table all` output as the host prints it; the user's case
is the README's goose sandbox on slot 1 (10.213.0.5/30 on its veth) while the test suite, with a state
directory of its own, also asks for slot 1.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controller.substrates.local.addressing import (
    MAX_SLOTS,
    POOL6,
    choose_slot,
    ipv4_block,
    ipv6_block,
    networks_in_use,
    slot_is_free,
)

HOST_ETH0: dict[str, Any] = {
    "ifname": "eth0",
    "addr_info": [
        {"family": "inet", "local": "192.0.2.2", "prefixlen": 24},
        {"family": "inet6", "local": "fd00::2", "prefixlen": 64},
        {"family": "inet6", "local": "fe80::fc:ff:fe00:1", "prefixlen": 64},
    ],
}
GOOSE_VETH: dict[str, Any] = {
    "ifname": "kmv-af271a0f",
    "addr_info": [
        {"family": "inet", "local": "10.213.0.5", "prefixlen": 30},
        {"family": "inet6", "local": "fd6b:6d00:0:1::1", "prefixlen": 64},
    ],
}
DEFAULTS = [
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
    {"dst": "default", "gateway": "fd00::1", "dev": "eth0"},
    {"type": "multicast", "dst": "ff00::/8", "dev": "eth0", "table": "local"},
    {"dst": "10.0.0.0/8", "dev": "tun0"},  # a VPN's broad route: wider than km's pool, so it rules out nothing
    {"dst": "fc00::/7", "dev": "tun0"},
]


def in_use(addresses: list[dict[str, Any]], routes: list[dict[str, Any]]) -> list[Any]:
    return networks_in_use(addresses, routes)


def test_blocks_of_a_slot() -> None:
    assert ipv4_block(1) == ipaddress.ip_network("10.213.0.4/30")
    assert ipv6_block(1) == ipaddress.ip_network("fd6b:6d00:0:1::/64")
    assert ipv6_block(MAX_SLOTS) == ipaddress.ip_network(f"fd6b:6d00:0:{MAX_SLOTS:x}::/64")
    assert all(ipv6_block(slot).subnet_of(POOL6) for slot in (1, 2, 1000, MAX_SLOTS))


@pytest.mark.parametrize(
    ("case", "addresses", "routes", "preferred", "reserved", "expected"),
    [
        ("an empty host gives the preferred slot", [HOST_ETH0], DEFAULTS, 1, set(), 1),
        ("no preference starts at 1", [HOST_ETH0], DEFAULTS, None, set(), 1),
        ("the goose's /30 on the host is skipped", [HOST_ETH0, GOOSE_VETH], DEFAULTS, 1, set(), 2),
        (
            "only its IPv4 address: still skipped",
            [HOST_ETH0, {"ifname": "x", "addr_info": [{"local": "10.213.0.6", "prefixlen": 32}]}],
            [],
            1,
            set(),
            2,
        ),
        (
            "only its IPv6 /64 routed elsewhere: skipped",
            [HOST_ETH0],
            [{"dst": "fd6b:6d00:0:1::/64", "gateway": "fd00::9", "dev": "eth0"}],
            1,
            set(),
            2,
        ),
        ("a route to a single address of the block", [], [{"dst": "10.213.0.6", "dev": "x"}], 1, set(), 2),
        (
            "a local-table entry (another netns' view is not ours, but this one is)",
            [],
            [{"type": "local", "dst": "10.213.0.9", "dev": "x", "table": "local"}],
            2,
            set(),
            3,
        ),
        ("a route covering several blocks skips them all", [], [{"dst": "10.213.0.0/28", "dev": "y"}], 1, set(), 4),
        ("km's own pool routed elsewhere is all taken", [], [{"dst": "10.213.0.0/16", "dev": "wg0"}], 5, set(), None),
        ("broad and default routes rule out nothing", [HOST_ETH0], DEFAULTS, 7, set(), 7),
        ("a reserved slot (a stopped sandbox) is skipped", [], [], 3, {3, 4}, 5),
        ("the search wraps round", [], [], MAX_SLOTS, {MAX_SLOTS}, 1),
        ("an out-of-range preference starts at 1", [], [], MAX_SLOTS + 10, set(), 1),
        ("a link-local address is in no pool", [{"addr_info": [{"local": "fe80::1%kmv-x", "prefixlen": 64}]}], [], 1, set(), 1),
    ],
)
def test_choose_slot(
    case: str,
    addresses: list[dict[str, Any]],
    routes: list[dict[str, Any]],
    preferred: int | None,
    reserved: set[int],
    expected: int | None,
) -> None:
    assert choose_slot(preferred, in_use(addresses, routes), reserved) == expected, case


def test_every_slot_taken_gives_none() -> None:
    assert choose_slot(1, [], set(range(1, 6)), max_slots=5) is None


def test_a_peer_address_counts_too() -> None:
    facts = in_use([{"addr_info": [{"local": "192.0.2.9", "address": "10.213.0.10", "prefixlen": 32}]}], [])
    assert not slot_is_free(2, facts)
    assert slot_is_free(1, facts)


def test_unparseable_route_destinations_are_ignored() -> None:
    assert in_use([], [{"dst": "not-an-address"}, {}]) == []
