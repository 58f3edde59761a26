"""The host's nftables rules for one sandbox link, and the sysctl changes IPv6 forwarding needs (pure).

What a sandbox may reach is decided inside it, by the host agent's gate. The host decides what may reach
the sandbox, and what the sandbox may open on the host itself:
- forward into the sandbox link: replies only (established/related). So no other sandbox, no other
  namespace and nothing routed through the host opens a connection into it, and two sandboxes cannot
  talk to each other in either direction (each one's link refuses the other's first packet);
- output from the host into the link: replies only, plus IPv6 neighbour discovery;
- input from the link to the host itself: replies, IPv6 neighbour discovery (the link needs it), and
  DNS to the sandbox's resolver upstream when that upstream is one of the host's own addresses. Nothing
  else: a sandbox cannot open the host's services, not even on its own gateway address;
- NAT66: the sandbox's IPv6 address is masqueraded on every interface but its own link (the IPv4
  masquerade rule lives in the `ip km` table beside these).
Every rule carries the comment `km:<sandbox id>`, so destroy and `km doctor --local` remove exactly them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from host_agent import upstream

FAMILY = "inet"
TABLE = "km"
LEGACY_NAT = ("ip", "km", "postrouting")  # the IPv4 masquerade rules: same table name, family ip
CHAINS = {
    "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
    "forward": "type filter hook forward priority filter; policy accept;",
    "input": "type filter hook input priority filter; policy accept;",
    "output": "type filter hook output priority filter; policy accept;",
}
NEIGHBOUR_DISCOVERY = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"


@dataclass(frozen=True)
class Rule:
    family: str
    table: str
    chain: str
    expression: str  # without the comment

    def add_command(self, sandbox_id: str) -> str:
        return f'add rule {self.family} {self.table} {self.chain} {self.expression} comment "km:{sandbox_id}"'


def table_script() -> str:
    """`nft -f` input that creates the table and its base chains if missing (adds nothing else)."""
    chains = "".join(f"  chain {name} {{\n    {hook}\n  }}\n" for name, hook in CHAINS.items())
    return f"table {FAMILY} {TABLE} {{\n{chains}}}\n"


def link_rules(
    host_interface: str,
    sandbox_address: str,
    sandbox_address6: str | None,
    host_dns: Iterable[tuple[str, int]] = (),
) -> list[Rule]:
    """The rules for one sandbox link, in the order they must be added (accepts before the drop).

    `sandbox_address6` is None on a host without IPv6. `host_dns` are the (address, port) upstreams of
    the sandbox's resolver that are addresses of the host itself.
    """
    link = f'"{host_interface}"'

    def rule(chain: str, expression: str, family: str = FAMILY, table: str = TABLE) -> Rule:
        return Rule(family, table, chain, expression)

    rules = [rule("postrouting", f"ip saddr {sandbox_address} oifname != {link} masquerade", *LEGACY_NAT[:2])]
    if sandbox_address6:
        rules.append(rule("postrouting", f"ip6 saddr {sandbox_address6} oifname != {link} masquerade"))
    rules += [
        rule("forward", f"oifname {link} ct state established,related accept"),
        rule("forward", f"oifname {link} drop"),
        rule("output", f"oifname {link} ct state established,related accept"),
        rule("output", f"oifname {link} {NEIGHBOUR_DISCOVERY} accept"),
        rule("output", f"oifname {link} drop"),
        rule("input", f"iifname {link} ct state established,related accept"),
        rule("input", f"iifname {link} {NEIGHBOUR_DISCOVERY} accept"),
    ]
    for address, port in host_dns:
        version = "ip" if ipaddress.ip_address(address).version == 4 else "ip6"
        for protocol in ("udp", "tcp"):
            rules.append(rule("input", f"iifname {link} {version} daddr {address} {protocol} dport {port} accept"))
    rules.append(rule("input", f"iifname {link} drop"))
    return rules


def host_dns_upstreams(
    upstreams: Iterable[tuple[str, int]], host_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> list[tuple[str, int]]:
    """The resolver upstreams the input chain must let through: those that are the host's own addresses.

    Any other upstream is reached through the forward path like any destination; a loopback upstream
    (127.0.0.53) is the sandbox's own loopback from inside, never the host's.
    """
    local = set(host_addresses)
    return [(address, port) for address, port in upstreams if ipaddress.ip_address(address) in local]


def parse_upstream(text: str) -> tuple[str, int] | None:
    """An upstream as the host agent reads KM_DNS_UPSTREAM (host_agent/upstream.py); None if unreadable."""
    try:
        return upstream.parse_upstream(text)
    except ValueError:
        return None


def sandbox_dns_upstream(configured: str | None, resolv_conf: str) -> tuple[str, int] | None:
    """Where a local sandbox's resolver forwards: KM_LOCAL_DNS_UPSTREAM, else the host's first nameserver
    a sandbox can reach (a loopback one, such as resolved's stub, is the sandbox's own loopback there)."""
    if configured:
        return parse_upstream(configured)
    for server in upstream.nameservers(resolv_conf):
        found = parse_upstream(server)
        if found is not None and not ipaddress.ip_address(found[0]).is_loopback:
            return found
    return None


def accept_ra_fixes(accept_ra: Mapping[str, int]) -> dict[str, int]:
    """The `accept_ra` values to write before turning IPv6 forwarding on.

    With forwarding on, `accept_ra=1` means "ignore router advertisements": a host configured by RA
    would lose its default route at the next expiry. `2` accepts them even when forwarding, which is what
    those interfaces did before. Keys are /proc/sys/net/ipv6/conf entries (`all`, `default`, interfaces).
    """
    return {name: 2 for name, value in accept_ra.items() if value == 1}
