#!/usr/bin/env python3
"""What an agent would do on the network, one operation per call, run inside a sandbox (stdlib only).

net_probe resolve NAME          → the addresses, or `gaierror <code>`
net_probe connect IP PORT       → `ok`, or `errno <n>`
net_probe http HOST             → the response body, or `errno <n>` / `gaierror <code>`
net_probe http-as IP HOST       → `<status> <body>` of a request to IP that names HOST in its Host header
net_probe https HOST [SNI]      → `<status> <body>` over TLS to HOST:443 sending SNI (default HOST); `closed`
net_probe https-get HOST PATH   → `<status> <body>` of GET PATH over TLS to HOST:443
net_probe udp IP PORT           → `ok` (sent and echoed), `sent` (no reply), or `errno <n>`
net_probe dns SERVER NAME [tcp] → `rcode <n> <addresses…>` from that server, or `errno <n>`
"""

import random
import socket
import ssl
import struct
import sys


def http_exchange(connection: socket.socket, host: str, path: str = "/") -> str:
    """`<status> <body>` of one GET naming `host`, or `closed` when the peer hung up without a reply."""
    connection.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    response = connection.makefile("rb").read().decode(errors="replace")
    if not response:
        return "closed"
    head, _, body = response.partition("\r\n\r\n")
    return f"{head.split()[1]} {body.strip()}"


def query(name: str) -> bytes:
    header = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack(">HH", 1, 1)


def parse(reply: bytes) -> str:
    rcode = reply[3] & 0x0F
    answers = struct.unpack(">H", reply[6:8])[0]
    offset = 12
    while reply[offset]:  # the question's name
        offset += reply[offset] + 1
    offset += 5
    addresses = []
    for _ in range(answers):
        offset += 2 if reply[offset] & 0xC0 == 0xC0 else _skip_name(reply, offset)
        rtype, _, _, length = struct.unpack(">HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == 1:
            addresses.append(socket.inet_ntoa(reply[offset : offset + length]))
        offset += length
    return " ".join([f"rcode {rcode}", *addresses])


def _skip_name(reply: bytes, offset: int) -> int:
    start = offset
    while reply[offset] and reply[offset] & 0xC0 != 0xC0:
        offset += reply[offset] + 1
    return offset - start + (2 if reply[offset] else 1)


def main(args: list[str]) -> str:
    operation = args[0]
    try:
        if operation == "resolve":
            return " ".join(sorted({info[4][0] for info in socket.getaddrinfo(args[1], 80, type=socket.SOCK_STREAM)}))
        if operation == "connect":
            with socket.create_connection((args[1], int(args[2])), timeout=5):
                return "ok"
        if operation == "http":
            with socket.create_connection((args[1], 80), timeout=5) as connection:
                connection.sendall(f"GET / HTTP/1.0\r\nHost: {args[1]}\r\n\r\n".encode())
                return connection.makefile("rb").read().decode().split("\r\n\r\n", 1)[-1].strip()
        if operation == "http-as":
            with socket.create_connection((args[1], 80), timeout=5) as connection:
                return http_exchange(connection, args[2])
        if operation in ("https", "https-get"):
            context = ssl.create_default_context()
            context.check_hostname = False  # the world's certificate is self-signed; the SNI is what matters
            context.verify_mode = ssl.CERT_NONE
            server_name = args[2] if operation == "https" and len(args) > 2 else args[1]
            path = args[2] if operation == "https-get" else "/"
            with socket.create_connection((args[1], 443), timeout=5) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname=server_name) as connection:
                        return http_exchange(connection, server_name, path)
                except (ssl.SSLError, ConnectionResetError, ssl.SSLEOFError):
                    return "closed"
        if operation == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(3)
                sock.sendto(b"ping", (args[1], int(args[2])))
                try:
                    return "ok" if sock.recv(64) == b"ping" else "wrong reply"
                except TimeoutError:
                    return "sent"
        if operation == "dns":
            packet = query(args[2])
            if len(args) > 3 and args[3] == "tcp":
                with socket.create_connection((args[1], 53), timeout=5) as connection:
                    connection.sendall(struct.pack(">H", len(packet)) + packet)
                    stream = connection.makefile("rb")
                    length = struct.unpack(">H", stream.read(2))[0]
                    return parse(stream.read(length))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(packet, (args[1], 53))
                reply, source = sock.recvfrom(4096)
                return f"{parse(reply)} from {source[0]}:{source[1]}"
    except socket.gaierror as error:
        return f"gaierror {error.errno}"
    except OSError as error:
        return f"errno {error.errno}" if error.errno else f"error {error}"
    return f"unknown operation {operation}"


if __name__ == "__main__":
    print(main(sys.argv[1:]))
