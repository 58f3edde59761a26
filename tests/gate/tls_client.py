"""The captured client: joins a cgroup, then makes TLS requests the test sends it, one JSON line each.

Usage: tls_client.py CGROUP_DIR (or `-` to stay where it was started). It has libssl mapped from the
start (`import ssl`), moves itself into the cgroup before any TLS call (writing its own pid, so this also
works as pid 1 of a new pid namespace), names itself `kmtls-client`, and prints its pid and pid namespace.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

COMM = "kmtls-client"


def connect(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a throw-away self-signed certificate on loopback
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw)


def get(port: int, request: str) -> dict[str, Any]:
    """Send the request as one write, read the response until the server closes."""
    with connect(port) as connection:
        connection.sendall(request.encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    return {"ok": True, "response": response.decode(errors="replace")}


def writes(port: int, count: int, size: int) -> dict[str, Any]:
    """`count` writes of `size` bytes in a tight loop; how long each took on average."""
    chunk = b"x" * size
    with connect(port) as connection:
        connection.sendall(b"SINK %d\r\n\r\n" % (count * size))
        started = time.perf_counter()
        for _ in range(count):
            connection.sendall(chunk)
        elapsed = time.perf_counter() - started
        reply = connection.recv(100)
    return {"ok": reply == b"done\n", "per_write_us": elapsed / count * 1e6}


OPERATIONS: dict[str, Callable[..., dict[str, Any]]] = {"get": get, "writes": writes}


def main() -> None:
    with open("/proc/self/comm", "w") as comm:
        comm.write(COMM)
    if sys.argv[1] != "-":
        with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    pidns = os.stat("/proc/self/ns/pid")
    print(json.dumps({"pid": os.getpid(), "pidns": [pidns.st_dev, pidns.st_ino]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        operation = OPERATIONS[request.pop("op")]
        print(json.dumps(operation(**request)), flush=True)


if __name__ == "__main__":
    main()
