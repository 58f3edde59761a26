"""A TLS server on 127.0.0.1 for the capture tests: python `ssl`, one thread per connection.

Usage: tls_server.py CERT KEY [ALPN,...]. Prints `ready <port>` once listening. Per connection:
- an HTTP/1.x request gets `200 OK` with a body naming the path, then the connection closes;
- `SINK <n>` (a header line, then a blank line) reads n more bytes, answers `done\\n` and closes
  (for the many-small-writes measurements);
- the HTTP/2 preface is read and the connection closed (the tests only look at what the client sent).
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def read_head(connection: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """(the head up to the blank line, whatever came after it)."""
    received = b""
    while b"\r\n\r\n" not in received and not received.startswith(H2_PREFACE):
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


def serve(connection: ssl.SSLSocket) -> None:
    with connection:
        head, rest = read_head(connection)
        if head.startswith(b"PRI * HTTP/2.0"):
            return
        if head.startswith(b"SINK "):
            remaining = int(head.split()[1]) - len(rest)
            while remaining > 0:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                remaining -= len(chunk)
            connection.sendall(b"done\n")
            return
        parts = head.split(b" ", 2)
        path = parts[1] if len(parts) > 1 else b"?"
        body = b"hello from tls_server " + path + b"\n"
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )


def handle(context: ssl.SSLContext, raw: socket.socket) -> None:
    try:
        serve(context.wrap_socket(raw, server_side=True))
    except (OSError, ValueError):
        raw.close()


def main() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    if len(sys.argv) > 3:
        context.set_alpn_protocols(sys.argv[3].split(","))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=handle, args=(context, raw), daemon=True).start()


if __name__ == "__main__":
    main()
