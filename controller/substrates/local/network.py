"""A local sandbox's network: its own namespace on a veth pair, a /30 of its own, NAT on the host.

Addresses come from 10.213.0.0/16 in /30 blocks indexed by the sandbox's slot, so two sandboxes
never share one. The host side routes and masquerades only that sandbox's address, with an nftables
rule tagged with the sandbox id, so destroy removes exactly what create added. What the sandbox may
reach is decided inside it, by the host agent's gate; the host only provides the path.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

POOL = ipaddress.ip_network("10.213.0.0/16")
MAX_SLOTS = POOL.num_addresses // 4 - 1
NFT_TABLE = "km"


class NetworkError(Exception):
    """Setting up or tearing down a sandbox network failed; the message names the command and its output."""


@dataclass(frozen=True)
class SandboxNetwork:
    sandbox_id: str
    slot: int

    @property
    def namespace(self) -> str:
        return f"km-{self.sandbox_id}"

    @property
    def host_interface(self) -> str:
        return f"kmv-{self.sandbox_id.rsplit('-', 1)[-1]}"  # interface names are limited to 15 characters

    @property
    def _block(self) -> ipaddress.IPv4Network:
        if not 1 <= self.slot <= MAX_SLOTS:
            raise NetworkError(f"network slot {self.slot} is outside 1..{MAX_SLOTS}")
        return ipaddress.IPv4Network((int(POOL.network_address) + 4 * self.slot, 30))

    @property
    def host_address(self) -> str:
        return str(self._block.network_address + 1)

    @property
    def sandbox_address(self) -> str:
        return str(self._block.network_address + 2)

    @property
    def namespace_path(self) -> Path:
        return Path("/run/netns") / self.namespace

    def create(self) -> None:
        """Idempotent: an existing namespace from an interrupted create is replaced."""
        self.destroy()
        ns, host_if = self.namespace, self.host_interface
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "addr", "add", f"{self.host_address}/30", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.sandbox_address}/30", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.host_address])
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        _ensure_nat_table()
        comment = f"km:{self.sandbox_id}"
        _run(["nft", "add", "rule", "ip", NFT_TABLE, "postrouting", "ip", "saddr", self.sandbox_address,
              "oifname", "!=", host_if, "masquerade", "comment", f'"{comment}"'])  # fmt: skip

    def destroy(self) -> None:
        """Remove the namespace, the veth and the NAT rule; absent pieces are fine."""
        for handle in (handle for handle, owner in nat_rules() if owner == self.sandbox_id):
            deleted = subprocess.run(
                ["nft", "delete", "rule", "ip", NFT_TABLE, "postrouting", "handle", str(handle)], capture_output=True, text=True
            )
            # Another km process (the reaper, a second destroy) may have deleted it since we listed it.
            if deleted.returncode != 0 and handle in {found for found, _ in nat_rules()}:
                raise NetworkError(f"deleting NAT rule {handle} of {self.sandbox_id} failed: {deleted.stderr.strip()}")
        subprocess.run(["ip", "link", "del", self.host_interface], capture_output=True, check=False)
        if self.namespace_path.exists():
            _run(["ip", "netns", "del", self.namespace])

    def exists(self) -> bool:
        return self.namespace_path.exists()


def _ensure_nat_table() -> None:
    script = (
        f"table ip {NFT_TABLE} {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n }}\n}}\n"
    )
    _run(["nft", "-f", "-"], stdin=script)


def nat_rules() -> list[tuple[int, str]]:
    """(handle, sandbox id) of every km masquerade rule; none when the table does not exist yet."""
    result = subprocess.run(["nft", "-j", "-a", "list", "chain", "ip", NFT_TABLE, "postrouting"], capture_output=True, text=True)
    if result.returncode != 0:
        return []
    rules = []
    for item in json.loads(result.stdout).get("nftables", []):
        comment = item.get("rule", {}).get("comment", "")
        if comment.startswith("km:"):
            rules.append((int(item["rule"]["handle"]), comment.removeprefix("km:")))
    return rules


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
