"""The sandbox's resolver against a fake upstream on loopback: what is forwarded, what is allowed and when, what never leaves.

Everything runs on 127.0.0.0/8 and ::1 with free ports; no root, no real DNS.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from host_agent.gatekeeper.allow_table import AllowTable
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.resolver import QueryRecord, Resolver

BIG_ADDRESSES = [f"198.18.{index // 250}.{index % 250 + 1}" for index in range(100)]
SLOW_SECONDS = 0.3


def _rrset(name: str, ttl: int, rdtype: str, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *values)


# What the fake upstream knows: (name, type) → answer section (+ additional section).
ZONE: dict[tuple[str, str], list[dns.rrset.RRset]] = {
    ("allowed.test.", "A"): [_rrset("allowed.test.", 300, "A", "198.51.100.1")],
    ("allowed.test.", "MX"): [_rrset("allowed.test.", 300, "MX", "10 mail.elsewhere.test.")],
    ("api.allowed.test.", "A"): [_rrset("api.allowed.test.", 300, "A", "198.51.100.2", "198.51.100.3")],
    ("api.allowed.test.", "AAAA"): [_rrset("api.allowed.test.", 300, "AAAA", "2001:db8::2")],
    ("cname.allowed.test.", "A"): [
        _rrset("cname.allowed.test.", 300, "CNAME", "target.elsewhere.test."),
        _rrset("target.elsewhere.test.", 120, "A", "203.0.113.2"),
    ],
    ("target.elsewhere.test.", "A"): [_rrset("target.elsewhere.test.", 120, "A", "203.0.113.2")],
    ("short.allowed.test.", "A"): [_rrset("short.allowed.test.", 1, "A", "198.51.100.9")],
    ("evil.test.", "A"): [_rrset("evil.test.", 300, "A", "203.0.113.66")],
    ("sneaky.evil.test.", "A"): [
        _rrset("sneaky.evil.test.", 300, "CNAME", "allowed.test."),
        _rrset("allowed.test.", 300, "A", "198.51.100.1"),
    ],
    ("junk.allowed.test.", "A"): [  # an unrelated record in the answer: not on the chain, never allowed
        _rrset("junk.allowed.test.", 300, "A", "198.51.100.5"),
        _rrset("unrelated.evil.test.", 300, "A", "203.0.113.67"),
    ],
    ("big.allowed.test.", "A"): [_rrset("big.allowed.test.", 300, "A", *BIG_ADDRESSES)],
    ("rude.allowed.test.", "A"): [_rrset("rude.allowed.test.", 300, "A", *BIG_ADDRESSES)],
    ("slow.allowed.test.", "A"): [_rrset("slow.allowed.test.", 300, "A", "198.51.100.7")],
}
ADDITIONAL = {("allowed.test.", "MX"): [_rrset("mail.elsewhere.test.", 300, "A", "203.0.113.44")]}
IGNORES_UDP_LIMIT = {"rude.allowed.test."}  # answers in full over UDP whatever the client said


@dataclass
class FakeUpstream:
    """A DNS server on one loopback port (UDP and TCP) answering from ZONE, recording every question it receives."""

    host: str = "127.0.0.1"
    received: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, transport)
    port: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._udp, self._tcp = _bind_udp_and_tcp(self.host)
        self.port = self._udp.getsockname()[1]
        self._udp.settimeout(0.01)
        self._tcp.settimeout(0.01)
        self._threads = [threading.Thread(target=loop, daemon=True) for loop in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    def names(self) -> list[str]:
        return [name for name, _type, _transport in self.received]

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._udp.close()
        self._tcp.close()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            reply = self._answer(wire, "udp")
            self._udp.sendto(reply, client)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._tcp.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                (length,) = struct.unpack("!H", _read(connection, 2))
                reply = self._answer(_read(connection, length), "tcp")
                connection.sendall(struct.pack("!H", len(reply)) + reply)

    def _answer(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        self.received.append((name, rdtype, transport))
        if name == "slow.allowed.test.":
            time.sleep(SLOW_SECONDS)
        response = dns.message.make_response(query, recursion_available=True)
        if not any(known == name for known, _ in ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.answer.extend(ZONE.get((name, rdtype), []))
        response.additional.extend(ADDITIONAL.get((name, rdtype), []))
        full = response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        if transport == "udp" and len(full) > limit and name not in IGNORES_UDP_LIMIT:
            truncated = dns.message.make_response(query, recursion_available=True)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()
        return full


def _bind_udp_and_tcp(host: str) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(20):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError("no free port on loopback")


def _read(connection: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class RecordingSink:
    """Records when each address reached the 'kernel'; optionally slow, to prove the reply waits for it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.allowed: dict[str, float] = {}
        self.revoked: list[str] = []
        self.broken = False

    def allow(self, network: str) -> None:
        if self.broken:
            raise OSError("BPF map full")
        time.sleep(self.delay)
        self.allowed[network] = time.monotonic()

    def revoke(self, network: str) -> None:
        self.revoked.append(network)


@dataclass
class Setup:
    resolver: Resolver
    upstream: FakeUpstream
    sink: RecordingSink
    records: list[QueryRecord]

    def ask(
        self,
        name: str,
        rdtype: str = "A",
        *,
        tcp: bool = False,
        host: str = "127.0.0.1",
        rdclass: str = "IN",
        use_edns: int | None = None,
        payload: int | None = None,
    ) -> dns.message.Message:
        message = dns.message.make_query(name, rdtype, rdclass, use_edns=use_edns, payload=payload)
        if tcp:
            return dns.query.tcp(message, host, port=self.resolver.port, timeout=5)
        return dns.query.udp(message, host, port=self.resolver.port, timeout=5)

    def wait_for_records(self, count: int) -> list[QueryRecord]:
        """on_query runs after the reply is sent, so give it a moment."""
        deadline = time.monotonic() + 2
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.records


POLICY = NamePolicy.from_lists([".allowed.test"], ["exact.test"])


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.close()


def _start(
    upstream: FakeUpstream,
    sink: RecordingSink,
    *,
    address: tuple[str, int] | None = None,
    timeout: float = 1.0,
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 0),),
) -> Setup:
    """A started resolver forwarding to the fake upstream (or to `address`, to play an upstream that is down)."""
    records: list[QueryRecord] = []
    forward_to = address or (upstream.host, upstream.port)
    resolver = Resolver(POLICY, forward_to, AllowTable(sink), listen=listen, on_query=records.append, timeout=timeout)
    resolver.start()
    return Setup(resolver, upstream, sink, records)


@pytest.fixture
def setup(upstream: FakeUpstream) -> Iterator[Setup]:
    started = _start(upstream, RecordingSink())
    yield started
    started.resolver.stop()


def _addresses(response: dns.message.Message) -> set[str]:
    return {
        rdata.address for rrset in response.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rdata in rrset
    }


# ---- allowed names ----------------------------------------------------------------------------------
def test_an_allowed_name_is_answered_and_its_address_allowed(setup: Setup) -> None:
    response = setup.ask("allowed.test")
    assert response.rcode() == dns.rcode.NOERROR
    assert _addresses(response) == {"198.51.100.1"}
    assert set(setup.sink.allowed) == {"198.51.100.1"}
    assert setup.upstream.received == [("allowed.test.", "A", "udp")]
    assert setup.wait_for_records(1) == [QueryRecord("allowed.test", "A", True, ("198.51.100.1",), "NOERROR")]


def test_addresses_reach_the_kernel_before_the_client_gets_its_reply(upstream: FakeUpstream) -> None:
    started = _start(upstream, RecordingSink(delay=0.1))
    try:
        asked = time.monotonic()
        response = started.ask("api.allowed.test")
        replied = time.monotonic()
    finally:
        started.resolver.stop()
    assert _addresses(response) == {"198.51.100.2", "198.51.100.3"}
    assert set(started.sink.allowed) == {"198.51.100.2", "198.51.100.3"}
    assert all(asked < allowed_at < replied for allowed_at in started.sink.allowed.values())
    assert replied - asked >= 0.2  # the reply waited for both (slow) map writes


@pytest.mark.parametrize("name", ["allowed.test", "allowed.test.", "ALLOWED.Test", "Api.ALLOWED.test."])
def test_case_and_trailing_dot_do_not_matter(setup: Setup, name: str) -> None:
    response = setup.ask(name)
    assert response.rcode() == dns.rcode.NOERROR and _addresses(response)


def test_aaaa_addresses_are_allowed(setup: Setup) -> None:
    response = setup.ask("api.allowed.test", "AAAA")
    assert _addresses(response) == {"2001:db8::2"}
    assert set(setup.sink.allowed) == {"2001:db8::2"}


def test_an_allowed_name_that_cnames_elsewhere_gets_its_final_address_allowed(setup: Setup) -> None:
    response = setup.ask("cname.allowed.test")
    assert _addresses(response) == {"203.0.113.2"}
    assert set(setup.sink.allowed) == {"203.0.113.2"}
    assert setup.wait_for_records(1)[0].addresses == ("203.0.113.2",)


def test_records_off_the_cname_chain_are_not_allowed(setup: Setup) -> None:
    response = setup.ask("junk.allowed.test")
    assert _addresses(response) == {"198.51.100.5", "203.0.113.67"}  # forwarded as upstream sent it...
    assert set(setup.sink.allowed) == {"198.51.100.5"}  # ...but only the queried name's address is allowed


def test_other_query_types_are_forwarded_and_additional_records_not_allowed(setup: Setup) -> None:
    response = setup.ask("allowed.test", "MX")
    assert response.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.MX]
    assert response.additional  # passed through to the client
    assert setup.sink.allowed == {}  # the additional section's A record is not allowed


def test_a_short_ttl_is_raised_to_the_floor(setup: Setup) -> None:
    setup.ask("short.allowed.test")
    (expiry,) = setup.resolver.table.snapshot().values()
    assert expiry is not None and expiry - time.monotonic() > 50


def test_tcp_queries_are_forwarded_over_tcp(setup: Setup) -> None:
    response = setup.ask("allowed.test", tcp=True)
    assert _addresses(response) == {"198.51.100.1"}
    assert setup.upstream.received == [("allowed.test.", "A", "tcp")]


def test_one_tcp_connection_carries_several_queries(setup: Setup) -> None:
    with socket.create_connection(("127.0.0.1", setup.resolver.port), timeout=5) as connection:
        for name in ("allowed.test", "api.allowed.test", "evil.test"):
            dns.query.send_tcp(connection, dns.message.make_query(name, "A"))
            response, _ = dns.query.receive_tcp(connection)
            assert response.rcode() == (dns.rcode.NXDOMAIN if name == "evil.test" else dns.rcode.NOERROR)


def test_a_large_answer_is_truncated_over_udp_and_complete_over_tcp(setup: Setup) -> None:
    over_udp = setup.ask("big.allowed.test")
    assert over_udp.flags & dns.flags.TC and not over_udp.answer
    assert setup.sink.allowed == {}
    over_tcp = setup.ask("big.allowed.test", tcp=True)
    assert _addresses(over_tcp) == set(BIG_ADDRESSES)
    assert set(setup.sink.allowed) == set(BIG_ADDRESSES)


def test_the_clients_edns_size_is_passed_upstream(setup: Setup) -> None:
    response = setup.ask("big.allowed.test", use_edns=0, payload=4096)
    assert not response.flags & dns.flags.TC
    assert _addresses(response) == set(BIG_ADDRESSES)


def test_an_answer_beyond_the_clients_udp_limit_is_truncated_by_the_resolver(setup: Setup) -> None:
    response = setup.ask("rude.allowed.test")  # upstream ignores the 512-byte limit
    assert response.flags & dns.flags.TC and not response.answer
    assert setup.ask("rude.allowed.test", tcp=True).answer


def test_a_slow_upstream_answer_does_not_hold_up_other_queries(setup: Setup) -> None:
    slow = threading.Thread(target=setup.ask, args=("slow.allowed.test",))
    slow.start()
    time.sleep(0.05)
    started = time.monotonic()
    setup.ask("allowed.test")
    assert time.monotonic() - started < SLOW_SECONDS
    slow.join()


# ---- denied names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "TXT", "MX", "HTTPS", "ANY"])
def test_a_denied_name_is_nxdomain_and_never_reaches_upstream(setup: Setup, rdtype: str) -> None:
    response = setup.ask("evil.test", rdtype)
    assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
    assert setup.upstream.received == [] and setup.sink.allowed == {}
    assert setup.wait_for_records(1) == [QueryRecord("evil.test", rdtype, False, (), "NXDOMAIN")]


@pytest.mark.parametrize(
    "name", ["evilallowed.test", "allowed.test.evil.test", "sub.exact.test", "exfiltrated-data-3f2a.evil.test"]
)
def test_names_outside_the_allowlist_are_denied(setup: Setup, name: str) -> None:
    assert setup.ask(name).rcode() == dns.rcode.NXDOMAIN
    assert setup.upstream.received == []


def test_a_denied_name_that_would_cname_into_the_allowlist_is_nxdomain(setup: Setup) -> None:
    response = setup.ask("sneaky.evil.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert setup.upstream.received == [] and setup.sink.allowed == {}


def test_a_denied_name_over_tcp_is_nxdomain(setup: Setup) -> None:
    assert setup.ask("evil.test", tcp=True).rcode() == dns.rcode.NXDOMAIN
    assert setup.upstream.received == []


def test_other_classes_are_refused(setup: Setup) -> None:
    assert setup.ask("allowed.test", "TXT", rdclass="CH").rcode() == dns.rcode.REFUSED
    assert setup.upstream.received == []


def test_zone_transfers_are_not_forwarded(setup: Setup) -> None:
    assert setup.ask("allowed.test", "AXFR", tcp=True).rcode() == dns.rcode.NOTIMP
    assert setup.upstream.received == []


# ---- malformed input --------------------------------------------------------------------------------
def _header(query_id: int, *, flags: int = 0x0100, questions: int = 1) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, questions, 0, 0, 0)


def _question(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00" + struct.pack("!HH", 1, 1)


GARBAGE = random.Random(5).randbytes(65000)
MALFORMED = {
    "two questions": _header(0x1111, questions=2) + _question(b"allowed", b"test") + _question(b"evil", b"test"),
    "no question": _header(0x2222, questions=0),
    "over-long name": _header(0x3333) + _question(*[b"a" * 63] * 5),
    "label type 0x40": _header(0x4444) + b"\x41" + b"a" * 65 + b"\x00" + struct.pack("!HH", 1, 1),
    "pointer loop": _header(0x5555) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
    "counts beyond the data": _header(0x6666, questions=9),
    "64 KiB of garbage": b"\x77\x77\x01\x00" + GARBAGE[4:],
}


def _exchange_raw_udp(port: int, wire: bytes) -> bytes | None:
    """The reply to raw bytes; on loopback a reply comes within milliseconds, so silence for 0.15 s means none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.15)
        sock.sendto(wire, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_queries_get_formerr_and_the_resolver_keeps_answering(setup: Setup, case: str) -> None:
    wire = MALFORMED[case]
    reply = _exchange_raw_udp(setup.resolver.port, wire)
    assert reply is not None
    assert reply[:2] == wire[:2] and reply[2] & 0x80 and reply[3] & 0x0F == dns.rcode.FORMERR
    assert setup.upstream.received == []
    assert setup.resolver.stats()["malformed"] == 1
    assert setup.ask("allowed.test").rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize(
    "wire",
    [b"", b"\x00", b"\x12\x34\x01\x00\x00", _header(0x8888, flags=0x8180)],
    ids=["empty", "1 byte", "5 bytes", "a response"],
)
def test_what_cannot_be_answered_is_dropped(setup: Setup, wire: bytes) -> None:
    assert _exchange_raw_udp(setup.resolver.port, wire) is None
    assert setup.ask("allowed.test").rcode() == dns.rcode.NOERROR


def test_malformed_queries_over_tcp_leave_the_connection_usable(setup: Setup) -> None:
    with socket.create_connection(("127.0.0.1", setup.resolver.port), timeout=5) as connection:
        wire = MALFORMED["over-long name"]
        connection.sendall(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", _read(connection, 2))
        assert _read(connection, length)[3] & 0x0F == dns.rcode.FORMERR
        dns.query.send_tcp(connection, dns.message.make_query("allowed.test", "A"))
        response, _ = dns.query.receive_tcp(connection)
        assert response.rcode() == dns.rcode.NOERROR


def test_non_query_opcodes_are_not_implemented(setup: Setup) -> None:
    reply = _exchange_raw_udp(setup.resolver.port, _header(0x9999, flags=0x2800) + _question(b"allowed", b"test"))  # UPDATE
    assert reply is not None and reply[3] & 0x0F == dns.rcode.NOTIMP
    assert setup.upstream.received == []


# ---- failures ---------------------------------------------------------------------------------------
def test_an_unreachable_upstream_gives_servfail_quickly(upstream: FakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    started = _start(upstream, RecordingSink(), address=("127.0.0.1", closed_port), timeout=0.3)
    try:
        asked = time.monotonic()
        assert started.ask("allowed.test").rcode() == dns.rcode.SERVFAIL
        assert started.ask("allowed.test", tcp=True).rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - asked < 1.5
        assert started.resolver.stats()["upstream_errors"] == 2
        assert started.wait_for_records(2)[0] == QueryRecord("allowed.test", "A", True, (), "SERVFAIL")
    finally:
        started.resolver.stop()


def test_a_silent_upstream_gives_servfail_within_two_timeouts(upstream: FakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))  # bound, never read: datagrams vanish, nothing is refused
        started = _start(upstream, RecordingSink(), address=black_hole.getsockname(), timeout=0.2)
        try:
            asked = time.monotonic()
            assert started.ask("allowed.test").rcode() == dns.rcode.SERVFAIL
            assert 0.35 < time.monotonic() - asked < 1.5  # one try and one retry, then give up
        finally:
            started.resolver.stop()


def test_when_the_kernel_map_refuses_the_client_gets_servfail(setup: Setup) -> None:
    setup.sink.broken = True
    assert setup.ask("allowed.test").rcode() == dns.rcode.SERVFAIL
    assert setup.resolver.stats()["allow_errors"] == 1


def test_a_failing_on_query_callback_does_not_stop_answers(upstream: FakeUpstream) -> None:
    def explode(record: QueryRecord) -> None:
        raise RuntimeError("audit log is broken")

    resolver = Resolver(POLICY, (upstream.host, upstream.port), AllowTable(RecordingSink()), on_query=explode)
    resolver.start()
    try:
        for _ in range(2):
            response = dns.query.udp(dns.message.make_query("allowed.test", "A"), "127.0.0.1", port=resolver.port, timeout=5)
            assert response.rcode() == dns.rcode.NOERROR
    finally:
        resolver.stop()


# ---- runtime behaviour ------------------------------------------------------------------------------
def test_a_policy_swap_takes_effect_for_the_next_query(setup: Setup) -> None:
    assert setup.ask("allowed.test").rcode() == dns.rcode.NOERROR
    setup.resolver.policy = NamePolicy.from_lists([".elsewhere.test"], [])
    assert setup.ask("allowed.test").rcode() == dns.rcode.NXDOMAIN
    assert setup.ask("target.elsewhere.test").rcode() == dns.rcode.NOERROR
    assert setup.upstream.names() == ["allowed.test.", "target.elsewhere.test."]


def test_stats_count_every_outcome(setup: Setup) -> None:
    setup.ask("allowed.test")
    setup.ask("api.allowed.test", tcp=True)
    setup.ask("evil.test")
    _exchange_raw_udp(setup.resolver.port, MALFORMED["two questions"])
    assert setup.resolver.stats() == {
        "queries": 4,
        "allowed": 2,
        "denied": 1,
        "upstream_errors": 0,
        "malformed": 1,
        "allow_errors": 0,
        "dropped": 0,
        "rejudged": 0,
    }


def test_one_port_serves_udp_and_tcp_on_every_listen_address(upstream: FakeUpstream) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    started = _start(upstream, RecordingSink(), listen=(("127.0.0.1", 0), ("::1", 0)))
    try:
        for host in ("127.0.0.1", "::1"):
            for tcp in (False, True):
                assert _addresses(started.ask("allowed.test", tcp=tcp, host=host)) == {"198.51.100.1"}
    finally:
        started.resolver.stop()


def test_stop_releases_the_port(upstream: FakeUpstream) -> None:
    started = _start(upstream, RecordingSink())
    port = started.resolver.port
    started.resolver.stop()
    again = Resolver(POLICY, (upstream.host, upstream.port), AllowTable(RecordingSink()), listen=(("127.0.0.1", port),))
    again.start()
    try:
        assert again.port == port
    finally:
        again.stop()


def test_port_before_start_is_an_error(upstream: FakeUpstream) -> None:
    with pytest.raises(RuntimeError):
        _ = Resolver(POLICY, (upstream.host, upstream.port), AllowTable(RecordingSink())).port
