"""The fake internet's servers, run inside the test world's network namespace (stdlib + dnspython).

`python -m tests.sandbox.world_server ZONE_JSON` serves, on every address of the namespace, IPv4 and
IPv6: DNS on 53 (UDP and TCP) from the zone (A, AAAA and CNAME records), HTTP on 80 and HTTPS on 443
(`hello from <address it was reached on>`; the certificate is `cert.pem` beside the zone file, made by
the caller), and a UDP echo on 7. It prints `ready` once every socket is bound, and counts DNS queries per name in
`queries.json` beside the zone file, so a test can prove a denied name never reached upstream.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset


class Zone:
    def __init__(self, file: Path) -> None:
        self.records: dict[str, list[dict[str, Any]]] = json.loads(file.read_text())
        self.queries_file = file.with_name("queries.json")
        self.queries: dict[str, int] = {}
        self.lock = threading.Lock()

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower()
        with self.lock:
            self.queries[name] = self.queries.get(name, 0) + 1
            self.queries_file.write_text(json.dumps(self.queries))
        records = self.records.get(name)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return bytes(response.to_wire())
        for record in records:  # CNAMEs first in the zone file, then the final addresses
            if record["type"] in ("CNAME", dns.rdatatype.to_text(question.rdtype)):
                owner = record.get("owner", name)
                response.answer.append(dns.rrset.from_text(owner, record["ttl"], "IN", record["type"], record["value"]))
        return bytes(response.to_wire())


class _UDP(socketserver.BaseRequestHandler):
    server: Any

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.zone.answer(data) if self.server.server_address[1] == 53 else data
        sock.sendto(reply, self.client_address)


class _TCPDNS(socketserver.StreamRequestHandler):
    server: Any

    def handle(self) -> None:
        length = int.from_bytes(self.rfile.read(2), "big")
        reply = self.server.zone.answer(self.rfile.read(length))
        self.wfile.write(len(reply).to_bytes(2, "big") + reply)


class _HTTP(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = f"hello from {self.connection.getsockname()[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _UDPServer(socketserver.ThreadingUDPServer):
    allow_reuse_address = True


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _V6Only:
    """An IPv6 twin of a server: a socket of its own (IPV6_V6ONLY), so IPv4 clients keep plain addresses."""

    address_family: int = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # type: ignore[attr-defined]
        super().server_bind()  # type: ignore[misc]


class _UDPServer6(_V6Only, _UDPServer):
    pass


class _TCPServer6(_V6Only, _TCPServer):
    pass


class _HTTPServer6(_V6Only, ThreadingHTTPServer):
    pass


def main() -> int:
    zone = Zone(Path(sys.argv[1]))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(zone.queries_file.with_name("cert.pem"), zone.queries_file.with_name("key.pem"))
    servers: list[socketserver.BaseServer] = []
    for any_address, udp_class, tcp_class, http_class in (
        ("0.0.0.0", _UDPServer, _TCPServer, ThreadingHTTPServer),
        ("::", _UDPServer6, _TCPServer6, _HTTPServer6),
    ):
        for port in (53, 7):
            udp = udp_class((any_address, port), _UDP)
            udp.zone = zone  # type: ignore[attr-defined]
            servers.append(udp)
        dns_tcp = tcp_class((any_address, 53), _TCPDNS)
        dns_tcp.zone = zone  # type: ignore[attr-defined]
        servers.append(dns_tcp)
        servers.append(http_class((any_address, 80), _HTTP))
        https = http_class((any_address, 443), _HTTP)
        https.socket = context.wrap_socket(https.socket, server_side=True)
        servers.append(https)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
