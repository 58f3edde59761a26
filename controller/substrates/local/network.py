"""A local sandbox's network: its own namespace on a veth pair, an address block per family, NAT on the host.

Each sandbox's slot gives it a /30 of 10.213.0.0/16 and a /64 of km's ULA /48 (`addressing`); the host
side of the veth is .1 and ::1 of them, the sandbox side .2 and ::2, with a default route in each family.
The host masquerades the sandbox's addresses (NAT44 and NAT66) and lets only replies into its link
(`host_rules`); every rule carries the sandbox id, so destroy removes exactly what create added. What the
sandbox may reach is decided inside it, by the host agent's gate; the host only provides the path.

Host-wide side effects of the first create: `net.ipv4.ip_forward=1` and, where the host has IPv6,
`net.ipv6.conf.all.forwarding=1`, with every `accept_ra=1` turned into `accept_ra=2` first so that
interfaces configured by router advertisements keep accepting them.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller.substrates.local import host_rules
from controller.substrates.local.addressing import MAX_SLOTS, POOL, SlotError, ipv4_block, ipv6_block

__all__ = ["MAX_SLOTS", "NFT_TABLE", "POOL", "KmRule", "NetworkError", "SandboxNetwork", "allocation_lock", "km_rules"]

NFT_TABLE = host_rules.TABLE
IPV6_SYSCTL = Path("/proc/sys/net/ipv6")
ALLOCATION_LOCK = Path("/run/km/network.lock")


class NetworkError(Exception):
    """Setting up or tearing down a sandbox network failed; the message names the command and its output."""


@dataclass(frozen=True)
class SandboxNetwork:
    sandbox_id: str
    slot: int
    dns_upstream: str | None = None  # IP[:PORT] of the sandbox's resolver upstream, if not the host's resolv.conf

    @property
    def namespace(self) -> str:
        return f"km-{self.sandbox_id}"

    @property
    def host_interface(self) -> str:
        return f"kmv-{self.sandbox_id.rsplit('-', 1)[-1]}"  # interface names are limited to 15 characters

    @property
    def _block(self) -> ipaddress.IPv4Network:
        try:
            return ipv4_block(self.slot)
        except SlotError as error:
            raise NetworkError(str(error)) from None

    @property
    def _block6(self) -> ipaddress.IPv6Network:
        try:
            return ipv6_block(self.slot)
        except SlotError as error:
            raise NetworkError(str(error)) from None

    @property
    def host_address(self) -> str:
        return str(self._block.network_address + 1)

    @property
    def sandbox_address(self) -> str:
        return str(self._block.network_address + 2)

    @property
    def host_address6(self) -> str:
        return str(self._block6.network_address + 1)

    @property
    def sandbox_address6(self) -> str:
        return str(self._block6.network_address + 2)

    @property
    def namespace_path(self) -> Path:
        return Path("/run/netns") / self.namespace

    def create(self) -> None:
        """Idempotent: an existing namespace from an interrupted create is replaced."""
        self.destroy()
        ns, host_if = self.namespace, self.host_interface
        ipv6 = IPV6_SYSCTL.is_dir()
        _run(["ip", "netns", "add", ns])
        if ipv6:  # a new namespace starts from the kernel's defaults; say it outright, eth0 inherits `default`
            settings = ("all/disable_ipv6", "default/disable_ipv6", "default/accept_ra")
            script = " && ".join(f"echo 0 > /proc/sys/net/ipv6/conf/{setting}" for setting in settings)
            _run(["ip", "netns", "exec", ns, "sh", "-c", script])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        # The link's rules (matched by interface name) are in place before it carries anything.
        rules = host_rules.link_rules(
            host_if, self.sandbox_address, self.sandbox_address6 if ipv6 else None, _host_dns_upstreams(self.dns_upstream)
        )
        script = _legacy_nat_table() + host_rules.table_script()
        script += "".join(rule.add_command(self.sandbox_id) + "\n" for rule in rules)
        _run(["nft", "-f", "-"], stdin=script)  # one transaction: all of the link's rules or none
        _run(["ip", "addr", "add", f"{self.host_address}/30", "dev", host_if])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.sandbox_address}/30", "dev", "eth0"])
        if ipv6:
            # The host learns nothing from a sandbox's router advertisements; nodad: usable at once.
            _write_sysctl(IPV6_SYSCTL / "conf" / host_if / "accept_ra", "0")
            _write_sysctl(IPV6_SYSCTL / "conf" / host_if / "disable_ipv6", "0")
            _run(["ip", "-6", "addr", "add", f"{self.host_address6}/64", "dev", host_if, "nodad"])
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{self.sandbox_address6}/64", "dev", "eth0", "nodad"])
        _run(["ip", "link", "set", host_if, "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.host_address])
        if ipv6:
            _run(["ip", "-n", ns, "-6", "route", "add", "default", "via", self.host_address6])
        _enable_forwarding(ipv6)

    def destroy(self) -> None:
        """Remove the namespace, the veth and the host rules; absent pieces are fine."""
        for rule in (rule for rule in km_rules() if rule.sandbox_id == self.sandbox_id):
            deleted = subprocess.run(["nft", "delete", "rule", *rule.location, "handle", str(rule.handle)],
                                     capture_output=True, text=True)  # fmt: skip
            # Another km process (the reaper, a second destroy) may have deleted it since we listed it.
            if deleted.returncode != 0 and rule in km_rules():
                raise NetworkError(f"deleting host rule {rule.describe()} of {self.sandbox_id} failed: {deleted.stderr.strip()}")
        subprocess.run(["ip", "link", "del", self.host_interface], capture_output=True, check=False)
        if self.namespace_path.exists():
            _run(["ip", "netns", "del", self.namespace])

    def exists(self) -> bool:
        return self.namespace_path.exists()


@contextmanager
def allocation_lock() -> Iterator[None]:
    """Held from choosing a slot until its addresses are on the host, by every km on this host.

    The host's addresses are the claim other state directories see; without the lock two creates could
    both see a block free and both add it (Linux lets two links carry one address).
    """
    ALLOCATION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with ALLOCATION_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _legacy_nat_table() -> str:
    family, table, chain = host_rules.LEGACY_NAT
    return f"table {family} {table} {{\n chain {chain} {{\n  {host_rules.CHAINS['postrouting']}\n }}\n}}\n"


def _enable_forwarding(ipv6: bool) -> None:
    _write_sysctl(Path("/proc/sys/net/ipv4/ip_forward"), "1")
    forwarding = IPV6_SYSCTL / "conf" / "all" / "forwarding"
    if not ipv6 or forwarding.read_text().strip() == "1":
        return
    current = {}
    for entry in (IPV6_SYSCTL / "conf").iterdir():
        try:
            current[entry.name] = int((entry / "accept_ra").read_text())
        except (OSError, ValueError):
            continue  # an interface that went away while we looked
    for name, value in host_rules.accept_ra_fixes(current).items():
        try:
            _write_sysctl(IPV6_SYSCTL / "conf" / name / "accept_ra", str(value))
        except OSError:
            continue
    _write_sysctl(forwarding, "1")


def _write_sysctl(path: Path, value: str) -> None:
    path.write_text(f"{value}\n")


def sandbox_upstream(configured: str | None) -> tuple[str, int] | None:
    """Where the sandbox's resolver forwards: `configured` (KM_LOCAL_DNS_UPSTREAM), else the host's first
    nameserver a sandbox can reach. The substrate names it in the sandbox's identity (KM_DNS_UPSTREAM)."""
    try:
        resolv_conf = Path("/etc/resolv.conf").read_text()
    except OSError:
        resolv_conf = ""
    return host_rules.sandbox_dns_upstream(configured, resolv_conf)


def _host_dns_upstreams(configured: str | None) -> list[tuple[str, int]]:
    """The sandbox resolver's upstream, when it is one of this host's own addresses (the input chain lets DNS to it in)."""
    upstream = sandbox_upstream(configured)
    return host_rules.host_dns_upstreams([upstream] if upstream else [], _host_addresses())


def _host_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    result = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=False)
    links = json.loads(result.stdout or "[]") if result.returncode == 0 else []
    return [
        ipaddress.ip_address(info["local"].split("%")[0])
        for link in links
        for info in link.get("addr_info", [])
        if info.get("local")
    ]


@dataclass(frozen=True)
class KmRule:
    """One nftables rule km added for a sandbox, where it lives and its handle."""

    family: str
    table: str
    chain: str
    handle: int
    sandbox_id: str

    @property
    def location(self) -> list[str]:
        return [self.family, self.table, self.chain]

    def describe(self) -> str:
        return f"{self.family} {self.table} {self.chain} handle {self.handle}"


def km_rules() -> list[KmRule]:
    """Every rule commented `km:<id>` in km's tables (`ip km` and `inet km`); none when they do not exist yet."""
    rules = []
    for family in ("ip", host_rules.FAMILY):
        result = subprocess.run(["nft", "-j", "-a", "list", "table", family, NFT_TABLE], capture_output=True, text=True)
        if result.returncode != 0:
            continue
        for item in json.loads(result.stdout).get("nftables", []):
            rule = item.get("rule", {})
            comment = rule.get("comment", "")
            if comment.startswith("km:"):
                rules.append(KmRule(family, rule["table"], rule["chain"], int(rule["handle"]), comment.removeprefix("km:")))
    return rules


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
