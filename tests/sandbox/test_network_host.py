"""A local sandbox's network on the real host, without a machine: root, namespaces and nftables only.

- The slot allocator skips a block that something else (another state directory's sandbox, any
  interface) has on the host, as the host shows it.
- A sandbox network carries both families (IPv6 enabled inside its namespace), and the host rules,
  all tagged with the sandbox id, are removed by destroy and by nothing else's destroy.
Every link and namespace made here is removed in teardown.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.substrates.local.addressing import choose_slot, ipv4_block, ipv6_block, observe_networks_in_use
from controller.substrates.local.network import SandboxNetwork, allocation_lock, km_rules

pytestmark = pytest.mark.root
PROBE = Path(__file__).with_name("net_probe.py")


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (veths, network namespaces, nftables): run as root, as CI does")


@pytest.fixture
def foreign_link() -> Iterator[str]:
    """A veth of somebody else's (no km name), on which a test puts a slot's addresses."""
    name = f"kmt{secrets.token_hex(4)}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def free_slot() -> int:
    slot = choose_slot(None, observe_networks_in_use())
    assert slot is not None
    return slot


def test_a_block_addressed_on_the_host_is_skipped_whoever_made_it(foreign_link: str) -> None:
    slot = free_slot()
    subprocess.run(["ip", "addr", "add", f"{ipv4_block(slot).network_address + 1}/30", "dev", foreign_link], check=True)
    assert choose_slot(slot, observe_networks_in_use()) != slot
    subprocess.run(["ip", "addr", "flush", "dev", foreign_link], check=True)
    assert choose_slot(slot, observe_networks_in_use()) == slot


def test_an_ipv6_block_addressed_on_the_host_is_skipped_too(foreign_link: str) -> None:
    slot = free_slot()
    address = f"{ipv6_block(slot).network_address + 7}/128"
    subprocess.run(["ip", "-6", "addr", "add", address, "dev", foreign_link, "nodad"], check=True)
    assert choose_slot(slot, observe_networks_in_use()) != slot


def test_a_block_only_routed_on_the_host_is_skipped(foreign_link: str) -> None:
    slot = free_slot()
    subprocess.run(["ip", "link", "set", foreign_link, "up"], check=True)
    subprocess.run(["ip", "route", "add", str(ipv4_block(slot)), "dev", foreign_link], check=True)
    assert choose_slot(slot, observe_networks_in_use()) != slot


def claim() -> SandboxNetwork:
    """A network for a made-up sandbox id on a free slot, claimed as km claims one (under the host lock)."""
    with allocation_lock():
        made = SandboxNetwork(f"nt-{secrets.token_hex(4)}", free_slot())
        try:
            made.create()
        except BaseException:
            made.destroy()
            raise
    return made


@pytest.fixture
def network() -> Iterator[SandboxNetwork]:
    made = claim()
    try:
        yield made
    finally:
        made.destroy()


def in_namespace(network: SandboxNetwork, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", network.namespace, *argv], capture_output=True, text=True, check=True).stdout


def test_a_sandbox_network_has_both_families_and_ipv6_is_on_inside(network: SandboxNetwork) -> None:
    assert in_namespace(network, "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").strip() == "0"
    links = json.loads(in_namespace(network, "ip", "-j", "addr", "show", "eth0"))
    addresses = {info["local"] for info in links[0]["addr_info"]}
    assert {network.sandbox_address, network.sandbox_address6} <= addresses
    routes = json.loads(in_namespace(network, "ip", "-j", "-6", "route", "show", "default"))
    assert routes[0]["gateway"] == network.host_address6
    assert ipaddress.ip_address(network.sandbox_address6) in ipv6_block(network.slot)
    assert open(f"/proc/sys/net/ipv6/conf/{network.host_interface}/accept_ra").read().strip() == "0"
    assert open("/proc/sys/net/ipv6/conf/all/forwarding").read().strip() == "1"


def test_the_namespace_opens_nothing_on_the_host_but_neighbour_discovery_works(network: SandboxNetwork) -> None:
    listeners = []
    for family, address in ((socket.AF_INET, network.host_address), (socket.AF_INET6, network.host_address6)):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((address, 0))
        listener.listen()
        listeners.append(listener)
    try:
        for listener in listeners:
            address, port = listener.getsockname()[:2]
            assert connect_from(network, address, port) != "ok"
    finally:
        for listener in listeners:
            listener.close()
    neighbours = json.loads(in_namespace(network, "ip", "-j", "-6", "neigh", "show", "dev", "eth0"))
    states = {entry["dst"]: entry.get("state", []) for entry in neighbours}
    assert network.host_address6 in states and "FAILED" not in states[network.host_address6]
    assert "INCOMPLETE" not in states[network.host_address6]


def connect_from(network: SandboxNetwork, address: str, port: int) -> str:
    """net_probe's `connect` run in the namespace (a plain process there: no gate, only the host's rules)."""
    return in_namespace(network, sys.executable, str(PROBE), "connect", address, str(port)).strip()


def test_its_host_rules_are_tagged_and_destroy_removes_exactly_them(network: SandboxNetwork) -> None:
    other = claim()
    try:
        mine = [rule for rule in km_rules() if rule.sandbox_id == network.sandbox_id]
        chains = {f"{rule.family} {rule.table} {rule.chain}" for rule in mine}
        assert chains == {"ip km postrouting", "inet km postrouting", "inet km forward", "inet km input", "inet km output"}
        other.destroy()
        assert not [rule for rule in km_rules() if rule.sandbox_id == other.sandbox_id]
        assert [rule for rule in km_rules() if rule.sandbox_id == network.sandbox_id] == mine
    finally:
        other.destroy()
    network.destroy()
    assert not [rule for rule in km_rules() if rule.sandbox_id == network.sandbox_id]
    assert not network.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert network.host_interface not in links
