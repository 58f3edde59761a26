"""The remote addresses of this network namespace's open TCP connections, from /proc/net/tcp{,6}.

The allow table keeps an expired address while a connection to it is open, so a DNS TTL running out
never cuts a download mid-way. Reading /proc needs no privilege and no netlink; it shows the network
namespace of the reading thread, which for the daemon is the sandbox's.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

PROC_NET = Path("/proc/net")

# Kernel TCP state numbers (include/net/tcp_states.h). CLOSE_WAIT is open too: the peer has finished
# sending, but this side still sends (an upload's tail, a response to a half-closed request).
ESTABLISHED = 0x01
SYN_SENT = 0x02
CLOSE_WAIT = 0x08
OPEN_STATES = frozenset({ESTABLISHED, SYN_SENT, CLOSE_WAIT})


def open_remote_addresses(proc_net: Path = PROC_NET) -> set[str]:
    """Remote addresses (as ipaddress spells them; v4-mapped IPv6 as IPv4) of connections that are open."""
    addresses: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            text = (proc_net / table).read_text()
        except FileNotFoundError:  # tcp6 is absent when IPv6 is disabled
            continue
        for line in text.splitlines():
            parsed = parse_socket_line(line)
            if parsed is not None and parsed[1] in OPEN_STATES:
                addresses.add(parsed[0])
    return addresses


def parse_socket_line(line: str) -> tuple[str, int] | None:
    """(remote address, TCP state) of one /proc/net/tcp{,6} row; None for the header or anything unreadable."""
    fields = line.split()
    if len(fields) < 4 or not fields[0].endswith(":"):
        return None
    remote, _, _port = fields[2].partition(":")
    try:
        return decode_address(remote), int(fields[3], 16)
    except ValueError:
        return None


def decode_address(hex_text: str) -> str:
    """The kernel prints each 32-bit word of the address in host byte order: undo that per word."""
    if len(hex_text) not in (8, 32):
        raise ValueError(f"not a /proc/net/tcp address: {hex_text!r}")
    packed = b"".join(struct.pack("=I", int(hex_text[index : index + 8], 16)) for index in range(0, len(hex_text), 8))
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)
