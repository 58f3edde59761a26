"""Pieces for running the gate together with the real resolver: a fake upstream DNS server, a child that
sends real DNS queries, and a clock the test moves by hand. No fixtures here; conftest.py stays as it is."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.gate.conftest import HERE, Child, bind_resolver_sockets

UPSTREAM_HOST = "127.0.77.53"  # any 127/8 address is this machine's loopback

# name -> (type, address, TTL) records the fake upstream answers with
Zone = Mapping[str, Sequence[tuple[str, str, int]]]


class FakeUpstream:
    """A UDP DNS server on loopback answering from `zone` (NXDOMAIN for other names); it records every question."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.questions: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((UPSTREAM_HOST, 0))
        self._sock.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-upstream-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def asked(self, name: str) -> bool:
        return any(asked == name for asked, _qtype in self.questions)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True)
            qtype = dns.rdatatype.to_text(question.rdtype)
            self.questions.append((name, qtype))
            response = dns.message.make_response(query)
            if name not in self.zone:
                response.set_rcode(dns.rcode.NXDOMAIN)
            for rdtype, address, ttl in self.zone.get(name, ()):
                if rdtype == qtype:
                    response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, address))
            self._sock.sendto(response.to_wire(), peer)


class ResolvingChild(Child):
    """A gated child (tests/gate/dnsclient.py) that also sends real DNS queries: `do("dns", host=…, port=53, name=…)`."""

    def __init__(self, cgroup: Path, prefix: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [*prefix, sys.executable, str(HERE / "dnsclient.py"), str(cgroup)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.host_pid = self.process.pid
        hello = self._read()
        self.pid = hello["pid"]
        self.pidns = (hello["pidns"][0], hello["pidns"][1])


class ManualClock:
    """Monotonic time for the allow table that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_resolver_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 and ::1 now; the gate is compiled with it before the resolver binds it,
    as the daemon compiles with its fixed port."""
    port, sockets = bind_resolver_sockets()
    for sock in sockets:
        sock.close()
    return port
