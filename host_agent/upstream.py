"""How a DNS upstream is written (`KM_DNS_UPSTREAM`, `KM_LOCAL_DNS_UPSTREAM`, resolv.conf): one reader for
the daemon, which forwards there, and the operator side, which opens the host's firewall for it.

Standard library only: the operator side imports it without the daemon's dependencies.
"""

from __future__ import annotations

import ipaddress


def parse_upstream(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT`, `[IPv6]:PORT`, or a bare (possibly scoped) IPv6 address; ValueError for anything
    else, names included: resolving a name would need a resolver."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return str(ipaddress.ip_address(host.rstrip("]"))), int(port or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return str(ipaddress.ip_address(host)), int(port)
    return str(ipaddress.ip_address(text.split("%")[0])), 53


def nameservers(resolv_conf: str) -> list[str]:
    """The `nameserver` entries of a resolv.conf text, in order."""
    fields = (line.split() for line in resolv_conf.splitlines())
    return [entry[1] for entry in fields if len(entry) >= 2 and entry[0] == "nameserver"]
