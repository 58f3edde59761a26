"""Servers inside the test's network namespace: on each address given, TCP and UDP on each port given,
answering every message with `<local address>|<message>` so a test sees who really answered."""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    ports = [int(port) for port in sys.argv[1].split(",")]
    addresses = sys.argv[2:]
    selector = selectors.DefaultSelector()
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in ports:
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen(64)
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ, "accept")
            datagram = socket.socket(family, socket.SOCK_DGRAM)
            datagram.bind((address, port))
            selector.register(datagram, selectors.EVENT_READ, "datagram")
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            local = sock.getsockname()[0]
            if key.data == "accept":
                connection, _ = sock.accept()
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ, "stream")
            elif key.data == "datagram":
                data, peer = sock.recvfrom(4096)
                sock.sendto(f"{local}|".encode() + data, peer)
            else:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    sock.sendall(f"{local}|".encode() + data)
                else:
                    selector.unregister(sock)
                    sock.close()


if __name__ == "__main__":
    main()
