"""A narrowed allowlist against queries in flight, and answers pointing into private ranges, with the real resolver.

The upstream stand-in holds each answer until the test lets it go, so the test narrows the policy exactly
while a query is between "judged" and "learned". Threads and events only: nothing waits on a clock.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from host_agent.gatekeeper.allow_table import AllowTable
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.resolver import QueryRecord, Resolver

ZONE = {
    "kept.allowed.test.": ["198.51.100.10"],
    "dropped.allowed.test.": ["198.51.100.20"],
    "rebind.allowed.test.": ["10.0.0.5", "198.51.100.30", "127.0.0.1"],
    "lan6.allowed.test.": ["fd00:1::5"],
}
WIDE = NamePolicy.from_lists([".allowed.test"], [])
NARROW = NamePolicy.from_lists(["kept.allowed.test", "rebind.allowed.test"], [])


class HeldUpstream:
    """A UDP DNS server on loopback that answers from ZONE only once `release` is set; `asked` says a query came."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        self.questions: list[str] = []
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, name="held-upstream", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.release.set()
        self._stopping.set()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:  # closing alone would not wake recvfrom
            waker.sendto(b"", self.address)
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while True:
            wire, client = self._sock.recvfrom(65535)
            if self._stopping.is_set():
                return
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text().lower()
            self.questions.append(name)
            self.asked.set()
            self.release.wait(10)
            response = dns.message.make_response(query)
            for address in ZONE.get(name, []):
                rdtype = "AAAA" if ":" in address else "A"
                if dns.rdatatype.to_text(query.question[0].rdtype) == rdtype:
                    response.answer.append(dns.rrset.from_text(name, 300, "IN", rdtype, address))
            self._sock.sendto(response.to_wire(), client)


@dataclass
class Sink:
    present: set[str] = field(default_factory=set)

    def allow(self, network: str, *, static: bool = False) -> None:
        self.present.add(network)

    def revoke(self, network: str) -> None:
        self.present.discard(network)


@dataclass
class World:
    upstream: HeldUpstream
    sink: Sink
    table: AllowTable
    resolver: Resolver
    records: list[QueryRecord]
    recorded: threading.Event

    def ask_in_background(self, name: str, rdtype: str = "A") -> tuple[threading.Thread, dict[str, dns.message.Message]]:
        replies: dict[str, dns.message.Message] = {}

        def ask() -> None:
            query = dns.message.make_query(name, rdtype)
            replies["reply"] = dns.query.udp(query, "127.0.0.1", port=self.resolver.port, timeout=10)

        thread = threading.Thread(target=ask, name="client")
        thread.start()
        return thread, replies

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        self.upstream.release.set()
        thread, replies = self.ask_in_background(name, rdtype)
        thread.join(10)
        return replies["reply"]

    def narrow_to(self, policy: NamePolicy) -> list[str]:
        """What Gatekeeper.reload does when names are removed."""
        return self.table.clear_dynamic(lambda epoch: self.resolver.set_policy(policy, epoch))

    def record(self) -> QueryRecord:
        assert self.recorded.wait(10)  # on_query runs just after the reply is sent
        return self.records[-1]


@pytest.fixture
def world() -> Iterator[World]:
    upstream = HeldUpstream()
    sink = Sink()
    table = AllowTable(sink)
    records: list[QueryRecord] = []
    recorded = threading.Event()

    def on_query(record: QueryRecord) -> None:
        records.append(record)
        recorded.set()

    resolver = Resolver(WIDE, upstream.address, table, on_query=on_query, timeout=10)
    resolver.start()
    try:
        yield World(upstream, sink, table, resolver, records, recorded)
    finally:
        resolver.stop()
        upstream.close()


def test_a_name_removed_while_upstream_answers_gets_nxdomain_and_opens_nothing(world: World) -> None:
    client, replies = world.ask_in_background("dropped.allowed.test")
    assert world.upstream.asked.wait(10)  # judged allowed under the wide policy, waiting for upstream

    world.narrow_to(NARROW)
    world.upstream.release.set()
    client.join(10)

    assert replies["reply"].rcode() == dns.rcode.NXDOMAIN
    assert world.sink.present == set()  # the answer computed under the old policy never reached the map
    record = world.record()
    assert (record.name, record.allowed, record.rcode) == ("dropped.allowed.test", False, "NXDOMAIN")
    assert world.resolver.stats()["rejudged"] == 1
    assert world.upstream.questions == ["dropped.allowed.test."]


def test_a_name_still_allowed_after_the_narrowing_is_learned_in_the_new_epoch(world: World) -> None:
    client, replies = world.ask_in_background("kept.allowed.test")
    assert world.upstream.asked.wait(10)

    world.narrow_to(NARROW)
    world.upstream.release.set()
    client.join(10)

    assert replies["reply"].rcode() == dns.rcode.NOERROR
    assert world.sink.present == {"198.51.100.10"}  # learned after the revoke, so it stays
    assert world.resolver.stats()["rejudged"] == 1


def test_queries_after_a_narrowing_are_judged_by_the_new_policy_alone(world: World) -> None:
    assert world.ask("dropped.allowed.test").rcode() == dns.rcode.NOERROR
    assert world.narrow_to(NARROW) == ["198.51.100.20"]

    assert world.ask("dropped.allowed.test").rcode() == dns.rcode.NXDOMAIN
    assert world.sink.present == set()
    assert world.resolver.stats()["rejudged"] == 0


def test_an_epoch_the_resolver_was_never_given_fails_the_query_instead_of_looping(world: World) -> None:
    client, replies = world.ask_in_background("kept.allowed.test")
    assert world.upstream.asked.wait(10)

    world.table.clear_dynamic(lambda _epoch: None)  # a caller that forgot to hand the resolver its policy
    world.upstream.release.set()
    client.join(10)

    assert replies["reply"].rcode() == dns.rcode.SERVFAIL
    assert world.sink.present == set()


def test_private_and_loopback_answers_are_passed_on_but_not_opened_and_the_record_says_why(world: World) -> None:
    reply = world.ask("rebind.allowed.test")

    answered = {rdata.address for rrset in reply.answer for rdata in rrset}
    assert answered == {"10.0.0.5", "198.51.100.30", "127.0.0.1"}  # the client sees the answer as it was
    assert world.sink.present == {"198.51.100.30"}
    record = world.record()
    assert set(record.refused) == {("10.0.0.5", "private"), ("127.0.0.1", "loopback")}
    assert set(record.addresses) == answered


def test_a_unique_local_ipv6_answer_is_not_opened(world: World) -> None:
    world.ask("lan6.allowed.test", "AAAA")

    assert world.sink.present == set()
    assert world.record().refused == (("fd00:1::5", "private"),)


def test_allowed_cidrs_covering_a_private_answer_make_it_reachable_and_unreported(world: World) -> None:
    world.table.set_static(["10.0.0.0/24"])

    world.ask("rebind.allowed.test")

    assert world.sink.present == {"10.0.0.0/24", "198.51.100.30"}
    assert world.record().refused == (("127.0.0.1", "loopback"),)
    assert world.table.unreachable_range(ipaddress.ip_address("10.0.0.5")) is None
