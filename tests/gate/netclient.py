"""The gated child: joins a cgroup, then runs network operations the test sends it, one JSON line each.

It moves itself into the cgroup (writing its own pid, which cgroup.procs reads in the writer's pid
namespace, so this also works as pid 1 of a new namespace) before it touches the network, and names
itself `kmgate-client` so events can be matched by comm.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

COMM = "kmgate-client"
kept: dict[str, socket.socket] = {}


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def failure(exc: OSError, started: float) -> dict[str, Any]:
    if isinstance(exc, TimeoutError):
        return {"ok": False, "error": "timeout", "elapsed": time.monotonic() - started}
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return {"ok": False, "error": name, "elapsed": time.monotonic() - started}


def tcp(host: str, port: int, payload: str = "ping", keep: str | None = None, payload_hex: str | None = None) -> dict[str, Any]:
    """Connect, send (text, or bytes given as hex), return the first reply (binary shown with replacements)."""
    started = time.monotonic()
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect((host, port))
        sock.sendall(bytes.fromhex(payload_hex) if payload_hex is not None else payload.encode())
        reply = sock.recv(4096).decode(errors="replace")
        result = {"ok": True, "reply": reply, "peer": list(sock.getpeername()[:2]), "elapsed": time.monotonic() - started}
    except OSError as exc:
        sock.close()
        return failure(exc, started)
    if keep:
        kept[keep] = sock
    else:
        sock.close()
    return result


def send(name: str, payload: str = "again") -> dict[str, Any]:
    started = time.monotonic()
    sock = kept[name]
    try:
        sock.sendall(payload.encode())
        return {"ok": True, "reply": sock.recv(4096).decode(), "elapsed": time.monotonic() - started}
    except OSError as exc:
        return failure(exc, started)


def udp_sendto(host: str, port: int, payload: str = "query") -> dict[str, Any]:
    started = time.monotonic()
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        try:
            sock.sendto(payload.encode(), (host, port))
            data, source = sock.recvfrom(4096)
        except OSError as exc:
            return failure(exc, started)
    return {"ok": True, "reply": data.decode(), "from": list(source[:2]), "elapsed": time.monotonic() - started}


def udp_connect(host: str, port: int, payload: str = "query") -> dict[str, Any]:
    started = time.monotonic()
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
            sock.send(payload.encode())
            data, source = sock.recvfrom(4096)
        except OSError as exc:
            return failure(exc, started)
    return {"ok": True, "reply": data.decode(), "from": list(source[:2]), "elapsed": time.monotonic() - started}


def open_socket(family: int, kind: int, proto: int) -> dict[str, Any]:
    """Only create the socket: what the sock_create hook decides."""
    started = time.monotonic()
    try:
        socket.socket(family, kind, proto).close()
    except OSError as exc:
        return failure(exc, started)
    return {"ok": True, "elapsed": time.monotonic() - started}


def bind(host: str, port: int, kind: str) -> dict[str, Any]:
    """Bind a `tcp` or `udp` socket (and close it again): what the bind hooks decide."""
    started = time.monotonic()
    with socket.socket(family_of(host), socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as sock:
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return failure(exc, started)
    return {"ok": True, "elapsed": time.monotonic() - started}


OPERATIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "socket": open_socket,
    "bind": bind,
    "tcp": tcp,
    "send": send,
    "udp_sendto": udp_sendto,
    "udp_connect": udp_connect,
}


def main() -> None:
    with open("/proc/self/comm", "w") as comm:
        comm.write(COMM)
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
