"""Which address blocks a local sandbox gets: one /30 of IPv4 and one /64 of IPv6 per slot.

A slot's blocks are pure arithmetic on its number. Which slot a new sandbox takes is decided from the
host's own view (`ip -j addr`, `ip -j route`, both families), not from km's state alone: a second state
directory (the test suite's, another operator's) knows nothing of the first one's sandboxes, but their
addresses and routes are on the host for everyone to see. The parsing and the choice are pure (facts in,
slot out); `observe_networks_in_use` is the only part that runs a command.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Collection, Iterable, Sequence
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

POOL = ipaddress.IPv4Network("10.213.0.0/16")
# km's ULA /48 (RFC 4193, fd00::/8 with a fixed global id): slot N owns fd6b:6d00:0:N::/64.
POOL6 = ipaddress.IPv6Network("fd6b:6d00::/48")
MAX_SLOTS = POOL.num_addresses // 4 - 1  # slot 0 would hold the pool's network address


class SlotError(ValueError):
    """A slot number outside the pool."""


def ipv4_block(slot: int) -> ipaddress.IPv4Network:
    _check(slot)
    return ipaddress.IPv4Network((int(POOL.network_address) + 4 * slot, 30))


def ipv6_block(slot: int) -> ipaddress.IPv6Network:
    _check(slot)
    return ipaddress.IPv6Network((int(POOL6.network_address) + (slot << 64), 64))


def _check(slot: int) -> None:
    if not 1 <= slot <= MAX_SLOTS:
        raise SlotError(f"network slot {slot} is outside 1..{MAX_SLOTS}")


def networks_in_use(addresses: Sequence[dict[str, Any]], routes: Sequence[dict[str, Any]]) -> list[IPNetwork]:
    """Every host address (as a single-address network) and route destination in `ip -j` output.

    Routes broader than km's pools (the default route, a VPN's 10.0.0.0/8, multicast ff00::/8) are left
    out: they would rule out every slot, and a sandbox's more specific block wins over them anyway.
    """
    found: list[IPNetwork] = []
    for link in addresses:
        for info in link.get("addr_info", []):
            for key in ("local", "address"):
                if info.get(key):
                    found.append(ipaddress.ip_network(info[key].split("%")[0]))
    for route in routes:
        destination = route.get("dst", "")
        if not destination or destination == "default":
            continue
        try:
            network = ipaddress.ip_network(destination.split("%")[0], strict=False)
        except ValueError:
            continue
        pool = POOL if network.version == 4 else POOL6
        if network.prefixlen >= pool.prefixlen:
            found.append(network)
    return found


def slot_is_free(slot: int, in_use: Iterable[IPNetwork]) -> bool:
    """Whether neither of the slot's blocks overlaps anything addressed or routed on the host."""
    blocks: tuple[IPNetwork, ...] = (ipv4_block(slot), ipv6_block(slot))
    return not any(network.version == block.version and network.overlaps(block) for network in in_use for block in blocks)


def choose_slot(
    preferred: int | None, in_use: Sequence[IPNetwork], reserved: Collection[int] = (), max_slots: int = MAX_SLOTS
) -> int | None:
    """The preferred slot when it is free, else the next free one (wrapping round); None when all are taken.

    `reserved` are slots km's own records hold while their network is down (a stopped sandbox after a
    reboot): they are not on the host now but will want their addresses back.
    """
    start = preferred if preferred is not None and 1 <= preferred <= max_slots else 1
    for offset in range(max_slots):
        slot = (start - 1 + offset) % max_slots + 1
        if slot not in reserved and slot_is_free(slot, in_use):
            return slot
    return None


def observe_networks_in_use() -> list[IPNetwork]:
    """The host's addresses and routes (all routing tables, both families), as `networks_in_use` reads them."""
    addresses = _ip_json(["ip", "-j", "addr"])
    routes = _ip_json(["ip", "-j", "-4", "route", "show", "table", "all"]) + _ip_json(
        ["ip", "-j", "-6", "route", "show", "table", "all"]
    )
    return networks_in_use(addresses, routes)


def _ip_json(argv: list[str]) -> list[dict[str, Any]]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return []  # e.g. IPv6 disabled on this host: nothing of that family is in use
    return list(json.loads(result.stdout))
