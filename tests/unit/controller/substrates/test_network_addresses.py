"""A local sandbox's addresses and names: pure arithmetic on its slot and id, no root needed.

Each slot owns one /30 of 10.213.0.0/16 (host side .1, sandbox side .2 of the block); slot 0 would be
the pool's network address, so slots start at 1.
"""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.state import new_sandbox_id
from controller.substrates.local.network import MAX_SLOTS, POOL, NetworkError, SandboxNetwork

SAMPLE_SLOTS = [1, 2, 3, 63, 64, 65, 255, 1000, 8191, 8192, MAX_SLOTS - 1, MAX_SLOTS]


def block(slot: int) -> ipaddress.IPv4Network:
    """The /30 the two addresses of a slot lie in, derived from them rather than from the code under test."""
    network = SandboxNetwork("sb-0123abcd", slot)
    host, sandbox = ipaddress.IPv4Address(network.host_address), ipaddress.IPv4Address(network.sandbox_address)
    containing = ipaddress.IPv4Network(f"{host}/30", strict=False)
    assert sandbox in containing
    return containing


def test_the_pool_holds_16383_slots() -> None:
    assert POOL == ipaddress.ip_network("10.213.0.0/16")
    assert MAX_SLOTS == 16383


@pytest.mark.parametrize(
    ("slot", "host", "sandbox"),
    [
        (1, "10.213.0.5", "10.213.0.6"),
        (2, "10.213.0.9", "10.213.0.10"),
        (63, "10.213.0.253", "10.213.0.254"),
        (64, "10.213.1.1", "10.213.1.2"),
        (MAX_SLOTS, "10.213.255.253", "10.213.255.254"),
    ],
)
def test_addresses_of_a_slot(slot: int, host: str, sandbox: str) -> None:
    network = SandboxNetwork("gebpfgk-0123abcd", slot)
    assert (network.host_address, network.sandbox_address) == (host, sandbox)


@pytest.mark.parametrize("slot", SAMPLE_SLOTS)
def test_each_slot_is_a_usable_30_inside_the_pool(slot: int) -> None:
    network = SandboxNetwork("sb-0123abcd", slot)
    host, sandbox = ipaddress.IPv4Address(network.host_address), ipaddress.IPv4Address(network.sandbox_address)
    containing = block(slot)
    assert containing.subnet_of(ipaddress.IPv4Network(POOL))
    assert list(containing.hosts()) == [host, sandbox]  # neither is the block's network or broadcast address


def test_sampled_slots_never_share_or_overlap_a_block() -> None:
    blocks = [block(slot) for slot in SAMPLE_SLOTS]
    assert len(set(blocks)) == len(blocks)
    for index, first in enumerate(blocks):
        for second in blocks[index + 1 :]:
            assert not first.overlaps(second)


def test_all_slots_together_tile_the_pool_except_its_first_block() -> None:
    """Every slot's block is distinct, so 1..MAX_SLOTS covers the pool once, leaving only 10.213.0.0/30."""
    hosts = {SandboxNetwork("sb-0123abcd", slot).host_address for slot in range(1, MAX_SLOTS + 1)}
    assert len(hosts) == MAX_SLOTS
    all_blocks = {ipaddress.IPv4Network(f"{host}/30", strict=False) for host in hosts}
    assert set(POOL.subnets(new_prefix=30)) - all_blocks == {ipaddress.IPv4Network("10.213.0.0/30")}


@pytest.mark.parametrize("slot", [0, -1, MAX_SLOTS + 1, 100_000])
@pytest.mark.parametrize("address", ["host_address", "sandbox_address"])
def test_a_slot_outside_the_pool_is_refused(slot: int, address: str) -> None:
    network = SandboxNetwork("sb-0123abcd", slot)
    with pytest.raises(NetworkError, match=rf"network slot {slot} is outside 1\.\.{MAX_SLOTS}"):
        getattr(network, address)


def test_the_address_depends_on_the_slot_only() -> None:
    first, second = SandboxNetwork("aa-00000000", 7), SandboxNetwork("zz-ffffffff", 7)
    assert (first.host_address, first.sandbox_address) == (second.host_address, second.sandbox_address)


def test_names_of_a_sandbox() -> None:
    network = SandboxNetwork("gebpfgk-0123abcd", 1)
    assert network.namespace == "km-gebpfgk-0123abcd"
    assert str(network.namespace_path) == "/run/netns/km-gebpfgk-0123abcd"
    assert network.host_interface == "kmv-0123abcd"


def test_the_longest_prefix_still_gives_a_short_interface_name() -> None:
    network = SandboxNetwork("abcdefghijkl-89abcdef", 1)
    assert network.host_interface == "kmv-89abcdef"
    assert network.namespace == "km-abcdefghijkl-89abcdef"


@given(st.from_regex(r"[a-z][a-z0-9]{0,11}", fullmatch=True))
def test_every_sandbox_id_gives_an_interface_name_linux_accepts(prefix: str) -> None:
    sandbox_id = new_sandbox_id(prefix)
    network = SandboxNetwork(sandbox_id, 1)
    # IFNAMSIZ is 16 including the terminating NUL.
    assert re.fullmatch(r"kmv-[0-9a-f]{8}", network.host_interface)
    assert len(network.host_interface) <= 15
    assert network.host_interface == f"kmv-{sandbox_id[-8:]}"
    assert network.namespace == f"km-{sandbox_id}"
