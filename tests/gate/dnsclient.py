"""The gated child of netclient.py with one more operation, `dns`: a real DNS query over UDP, as a stub resolver sends it.

Run in place of netclient.py (it joins the cgroup the same way); the reply reports the rcode, the A/AAAA
addresses of the answer and the address the reply appeared to come from.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import dns.exception
import dns.message
import dns.rdatatype
import netclient  # type: ignore[import-not-found]  # run as a script from this directory, like netclient.py


def dns_query(host: str, port: int, name: str, qtype: str = "A") -> dict[str, Any]:
    started = time.monotonic()
    query = dns.message.make_query(name, qtype)
    with socket.socket(netclient.family_of(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        try:
            sock.sendto(query.to_wire(), (host, port))
            wire, source = sock.recvfrom(65535)
        except OSError as exc:
            result: dict[str, Any] = netclient.failure(exc, started)
            return result
    try:
        reply = dns.message.from_wire(wire)
    except dns.exception.DNSException as exc:
        return {"ok": False, "error": f"unparseable reply: {exc}", "elapsed": time.monotonic() - started}
    addresses = [
        rdata.address for rrset in reply.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rdata in rrset
    ]
    return {
        "ok": True,
        "id_matches": reply.id == query.id,
        "rcode": int(reply.rcode()),
        "addresses": addresses,
        "from": list(source[:2]),
        "elapsed": time.monotonic() - started,
    }


if __name__ == "__main__":
    netclient.OPERATIONS["dns"] = dns_query
    netclient.main()
