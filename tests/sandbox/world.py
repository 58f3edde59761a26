"""The test world: a fake internet in a network namespace the test creates, routed from the host.

Sandboxes reach it the way they reach the real internet (their veth, the host's routing and NAT, IPv4
and IPv6), and
their resolver forwards to its DNS server (`KM_LOCAL_DNS_UPSTREAM`). No traffic leaves this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

# One /24 (and one /64) per test session, so two sessions on one host (a developer and a CI check) never
# share routes. 198.18.0.0/15 is the benchmarking range and 2001:db8::/32 the documentation range: neither
# is private (RFC 1918, 100.64.0.0/10, fc00::/7), so the sandbox's resolver learns their answers as it
# would a public name's; they exist only in the namespace the test creates.
SESSION = os.getpid() % 250 + 1
NETWORK = f"198.19.{SESSION}"
NETWORK6 = f"2001:db8:{SESSION:x}:"
DNS = f"{NETWORK}.2"
ADDRESSES = {
    "allowed": f"{NETWORK}.10",
    "api": f"{NETWORK}.11",
    "target": f"{NETWORK}.30",
    "evil": f"{NETWORK}.20",
    "unlisted": f"{NETWORK}.21",
    "cidr": f"{NETWORK}.40",
}
ADDRESSES6 = {
    "v6only": f"{NETWORK6}:10",  # v6only.allowed.test: AAAA only
    "evil": f"{NETWORK6}:20",  # v6only.evil.test: AAAA only, not allowed
    "unlisted": f"{NETWORK6}:21",  # in no answer at all
}
HOST6 = f"{NETWORK6}:1"  # the host's side of the world's link


def zone() -> dict[str, list[dict[str, object]]]:
    a, a6 = ADDRESSES, ADDRESSES6
    return {
        "allowed.test.": [{"type": "A", "ttl": 300, "value": a["allowed"]}],
        "api.allowed.test.": [{"type": "A", "ttl": 300, "value": a["api"]}],
        "v6only.allowed.test.": [{"type": "AAAA", "ttl": 300, "value": a6["v6only"]}],
        "evilallowed.test.": [{"type": "A", "ttl": 300, "value": a["evil"]}],
        "evil.test.": [{"type": "A", "ttl": 300, "value": a["evil"]}],
        "v6only.evil.test.": [{"type": "AAAA", "ttl": 300, "value": a6["evil"]}],
        "cname.allowed.test.": [
            {"type": "CNAME", "ttl": 300, "value": "target.elsewhere.test."},
            {"type": "A", "ttl": 300, "value": a["target"], "owner": "target.elsewhere.test."},
        ],
        "target.elsewhere.test.": [{"type": "A", "ttl": 300, "value": a["target"]}],
    }


@dataclass(frozen=True)
class World:
    namespace: str
    directory: Path

    def queries(self) -> dict[str, int]:
        file = self.directory / "queries.json"
        return dict(json.loads(file.read_text())) if file.exists() else {}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def fake_internet(directory: Path) -> Iterator[World]:
    suffix = secrets.token_hex(3)
    namespace, host_if, world_if = f"kmw-{suffix}", f"kmwh-{suffix}", f"kmww-{suffix}"
    (directory / "zone.json").write_text(json.dumps(zone()))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=allowed.test",
         "-addext", "subjectAltName=DNS:allowed.test,DNS:*.allowed.test",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    server = None
    try:
        _ip("netns", "add", namespace)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", world_if)
        _ip("link", "set", world_if, "netns", namespace)
        _ip("addr", "add", f"{NETWORK}.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "set", world_if, "up")
        for address in (DNS, *ADDRESSES.values()):
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", world_if)
        _ip("-n", namespace, "route", "add", "default", "via", f"{NETWORK}.1")
        # IPv6: the host's side ::1 (its connected /64 is the host's route to the world), the servers on
        # the rest; nodad so the addresses answer at once.
        _ip("-6", "addr", "add", f"{HOST6}/64", "dev", host_if, "nodad")
        for address in ADDRESSES6.values():
            _ip("-n", namespace, "-6", "addr", "add", f"{address}/64", "dev", world_if, "nodad")
        _ip("-n", namespace, "-6", "route", "add", "default", "via", HOST6)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "tests.sandbox.world_server", str(directory / "zone.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        assert server.stdout is not None
        deadline = time.monotonic() + 30
        line = server.stdout.readline()
        if line.strip() != "ready" or time.monotonic() > deadline:
            raise RuntimeError(f"the world's servers did not start: {line!r} {server.stderr.read() if server.stderr else ''}")
        yield World(namespace, directory)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
