"""The sandbox's DNS resolver: the only way a name becomes an address the kernel lets the sandbox reach.

The gate sends every port-53 packet from the sandbox here. For a name the policy allows, the query is
forwarded upstream and every A/AAAA address of the answer (through CNAMEs) is written into the allow
maps before the reply goes back, so the client's connect() that follows is already allowed. A name the
policy denies is answered NXDOMAIN without asking upstream: a denied name never leaves the machine, so
it cannot carry data out through DNS. Nothing a client sends may stop the serving loop: unparseable
queries get FORMERR (or are dropped), and a failing upstream gets SERVFAIL after a bounded wait.

Decisions (issue 5): a query is judged by its queried name only, so a denied name that would CNAME into
the allowlist is still NXDOMAIN, and an allowed name that CNAMEs elsewhere gets its final addresses
allowed. Only the answer section's A/AAAA records on the CNAME chain are learned (never additional
records, which a server may fill with anything). Other query types for allowed names are forwarded;
for denied names every type is NXDOMAIN. Addresses in private, loopback, link-local or multicast ranges are
passed on in the answer but not learned unless allowedCIDRs cover them (the record says why).

A narrowed allowlist applies to queries already in flight: each query is judged under one (policy, epoch)
snapshot, and if the allowlist was narrowed while upstream answered, the table refuses the stale answer
and the name is judged again under the new policy (NXDOMAIN if it is no longer allowed).

dnspython parses and builds messages; serving is plain sockets and daemon threads, one selector
thread for all listening sockets and one short-lived thread per query or TCP connection.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from host_agent.gatekeeper.allow_table import AllowTable, StalePolicy
from host_agent.gatekeeper.names import NamePolicy

log = logging.getLogger("km-host-agent.gate.resolver")

HEADER_LENGTH = 12
CLASSIC_UDP_LIMIT = 512  # RFC 1035: what a client without EDNS accepts
MAX_UPSTREAM_PAYLOAD = 4096
MAX_CNAME_HOPS = 16
TCP_IDLE_SECONDS = 10.0
MAX_INFLIGHT_QUERIES = 256  # beyond this, UDP queries are dropped (the client retries) rather than queued
MAX_TCP_CONNECTIONS = 64
ZONE_TRANSFERS = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})
STAT_NAMES = ("queries", "allowed", "denied", "upstream_errors", "malformed", "allow_errors", "dropped", "rejudged")


@dataclass(frozen=True)
class QueryRecord:
    """One answered query, for the audit log and learn mode: what was asked, what was decided, what was allowed."""

    name: str
    qtype: str
    allowed: bool
    addresses: tuple[str, ...]
    rcode: str
    refused: tuple[tuple[str, str], ...] = ()  # (address, range) of answers left closed: see AllowTable.learn


class UpstreamError(Exception):
    """Upstream did not answer usefully in time (refused, timed out, garbage); the client gets SERVFAIL."""


class Resolver:
    """Serves DNS on the listen addresses (UDP and TCP), answering from `policy`, `upstream` and `table`.

    `policy` may be widened at any time by assignment; a narrowed one comes with a new epoch through
    `set_policy`, which AllowTable.clear_dynamic calls. Each query reads both once. `timeout` bounds
    one upstream attempt; a failed attempt is retried once, so a client waits at most twice that.
    An IPv6 listen address on a machine without IPv6 is skipped with a warning (the gate still sends
    IPv4 DNS here); any other bind failure makes start() raise.
    """

    def __init__(
        self,
        policy: NamePolicy,
        upstream: tuple[str, int],
        table: AllowTable,
        *,
        listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
        on_query: Callable[[QueryRecord], None] | None = None,
        timeout: float = 2.0,
    ) -> None:
        if not listen:
            raise ValueError("the resolver needs at least one listen address")
        ipaddress.ip_address(upstream[0])  # an IP, not a host name: resolving it would need a resolver
        self._policy_state = (policy, table.epoch)  # one attribute: a query reads policy and epoch together
        self.upstream = upstream
        self.table = table
        self.listen = tuple(listen)
        self.on_query = on_query
        self.timeout = timeout
        self._stats: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._stats_lock = threading.Lock()
        self._udp: list[socket.socket] = []
        self._tcp: list[socket.socket] = []
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._inflight = threading.BoundedSemaphore(MAX_INFLIGHT_QUERIES)
        self._tcp_slots = threading.BoundedSemaphore(MAX_TCP_CONNECTIONS)
        self._wake_reader: socket.socket | None = None
        self._wake_writer: socket.socket | None = None
        self._stopping = threading.Event()
        self._serving: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=1)  # replaced by start()
        self._port = 0

    # ---- policy -----------------------------------------------------------------------------------
    @property
    def policy(self) -> NamePolicy:
        return self._policy_state[0]

    @policy.setter
    def policy(self, policy: NamePolicy) -> None:
        """A policy at least as wide as the current one: answers judged under the old one stay valid."""
        self._policy_state = (policy, self._policy_state[1])

    def set_policy(self, policy: NamePolicy, epoch: int) -> None:
        """A policy that may be narrower, in force from the table's `epoch` on (the publish of clear_dynamic)."""
        self._policy_state = (policy, epoch)

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port bound by start(); the one chosen for every port-0 listen address."""
        if not self._port:
            raise RuntimeError("the resolver is not started")
        return self._port

    def start(self) -> None:
        """Bind UDP and TCP on every listen address and serve from a daemon thread."""
        if self._serving is not None:
            raise RuntimeError("the resolver is already started")
        self._udp, self._tcp = self._bind_all()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stopping.clear()
        # Reused worker threads: starting a thread per query cost a noticeable share of each answer.
        self._pool = ThreadPoolExecutor(max_workers=MAX_INFLIGHT_QUERIES, thread_name_prefix="dns-udp-query")
        self._serving = threading.Thread(target=self._serve, name="dns-resolver", daemon=True)
        self._serving.start()

    def stop(self) -> None:
        """Stop serving and close every socket; queries already being answered finish on their own."""
        if self._serving is None:
            return
        self._stopping.set()
        assert self._wake_writer is not None and self._wake_reader is not None
        self._wake_writer.send(b"x")
        self._serving.join(timeout=5)
        self._serving = None
        self._pool.shutdown(wait=False)
        with self._connections_lock:
            for connection in self._connections:
                _shut(connection)
        for sock in [*self._udp, *self._tcp, self._wake_reader, self._wake_writer]:
            sock.close()
        self._udp, self._tcp = [], []

    def stats(self) -> dict[str, int]:
        """Counters since start: queries, allowed, denied, upstream_errors, malformed, allow_errors, dropped."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, stat: str) -> None:
        with self._stats_lock:
            self._stats[stat] += 1

    def _bind_all(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """One port for UDP and TCP on every address; port 0 picks a free one, retried if TCP finds it taken."""
        attempts = 20 if any(port == 0 for _host, port in self.listen) else 1
        for attempt in range(attempts):
            udp: list[socket.socket] = []
            tcp: list[socket.socket] = []
            shared = 0
            try:
                for host, port in self.listen:
                    bound = _bind_pair(host, port or shared)
                    if bound is None:
                        continue
                    udp.append(bound[0])
                    tcp.append(bound[1])
                    if port == 0 and not shared:
                        shared = bound[0].getsockname()[1]
                if not udp:
                    raise OSError(errno.EADDRNOTAVAIL, f"no listen address could be bound: {self.listen}")
                self._port = udp[0].getsockname()[1]
                return udp, tcp
            except OSError as error:
                for sock in [*udp, *tcp]:
                    sock.close()
                if error.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    # ---- serving ----------------------------------------------------------------------------------
    def _serve(self) -> None:
        """The one loop that owns the listening sockets; the work happens in per-query threads."""
        assert self._wake_reader is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
            for sock in self._udp:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, "udp")
            for sock in self._tcp:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, "tcp")
            while not self._stopping.is_set():
                for key, _events in selector.select():
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    try:
                        if key.data == "udp":
                            self._receive_datagram(listener)
                        elif key.data == "tcp":
                            self._accept(listener)
                    except Exception:  # the loop must outlive anything one packet does
                        log.exception("dns serving loop error")

    def _receive_datagram(self, sock: socket.socket) -> None:
        try:
            wire, client = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a socket error on one datagram is that datagram's problem, not the loop's
            return
        if not self._inflight.acquire(blocking=False):
            self._count("queries")
            self._count("dropped")
            return
        try:
            self._pool.submit(self._answer_datagram, sock, wire, client)
        except RuntimeError:  # no thread to be had: drop, as when too many are in flight
            self._inflight.release()
            self._count("queries")
            self._count("dropped")

    def _answer_datagram(self, sock: socket.socket, wire: bytes, client: tuple[str, int]) -> None:
        try:
            reply, record = self._handle(wire, "udp")
            if reply is not None:
                try:
                    sock.sendto(reply, client)
                except OSError:
                    pass  # the client went away, or stop() closed the socket
            self._report(record)
        finally:
            self._inflight.release()

    def _accept(self, listener: socket.socket) -> None:
        try:
            connection, _client = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if not self._tcp_slots.acquire(blocking=False):
            connection.close()
            return
        connection.setblocking(True)
        connection.settimeout(TCP_IDLE_SECONDS)
        with self._connections_lock:
            self._connections.add(connection)
        try:
            threading.Thread(target=self._serve_connection, args=(connection,), name="dns-tcp-client", daemon=True).start()
        except RuntimeError:
            with self._connections_lock:
                self._connections.discard(connection)
            connection.close()
            self._tcp_slots.release()

    def _serve_connection(self, connection: socket.socket) -> None:
        """Length-prefixed queries one after another (RFC 7766) until the client closes or idles out."""
        try:
            while not self._stopping.is_set():
                prefix = _receive_exactly(connection, 2)
                if prefix is None:
                    return
                (length,) = struct.unpack("!H", prefix)
                wire = _receive_exactly(connection, length) if length else None
                if wire is None:
                    return
                reply, record = self._handle(wire, "tcp")
                if reply is None:
                    return
                connection.sendall(struct.pack("!H", len(reply)) + reply)
                self._report(record)
        except OSError:
            return
        finally:
            with self._connections_lock:
                self._connections.discard(connection)
            connection.close()
            self._tcp_slots.release()

    def _report(self, record: QueryRecord | None) -> None:
        if record is None or self.on_query is None:
            return
        try:
            self.on_query(record)
        except Exception:
            log.exception("on_query callback failed")

    # ---- answering --------------------------------------------------------------------------------
    def _handle(self, wire: bytes, transport: str) -> tuple[bytes | None, QueryRecord | None]:
        """The reply to one query (None: send nothing) and what to report about it. Never raises."""
        self._count("queries")
        try:
            return self._answer(wire, transport)
        except Exception:
            log.exception("answering a dns query failed")
            return _header_only_reply(wire, dns.rcode.SERVFAIL), None

    def _answer(self, wire: bytes, transport: str) -> tuple[bytes | None, QueryRecord | None]:
        if len(wire) < HEADER_LENGTH or wire[2] & 0x80:  # too short for an id, or a response: never answer those
            self._count("malformed")
            return None, None
        if dns.opcode.from_flags(wire[2] << 8) != dns.opcode.QUERY:  # UPDATE, NOTIFY…: not a resolver's job
            return _header_only_reply(wire, dns.rcode.NOTIMP), None
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # any parser failure on client bytes means a malformed query
            self._count("malformed")
            return _header_only_reply(wire, dns.rcode.FORMERR), None
        if len(query.question) != 1:
            self._count("malformed")
            return _header_only_reply(wire, dns.rcode.FORMERR), None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        policy, epoch = self._policy_state
        if question.rdclass != dns.rdataclass.IN:
            rcode = dns.rcode.REFUSED  # CHAOS and friends describe the resolver, not the Internet
        elif question.rdtype in ZONE_TRANSFERS:
            rcode = dns.rcode.NOTIMP  # a stub resolver's clients have no business copying zones
        elif not policy.allows(question.name.to_text()):
            rcode = dns.rcode.NXDOMAIN
        else:
            rcode = dns.rcode.NOERROR
        if rcode != dns.rcode.NOERROR:
            self._count("denied")
            return _reply_with_rcode(query, rcode), QueryRecord(name, qtype, False, (), dns.rcode.to_text(rcode))
        self._count("allowed")
        try:
            response_wire, response = self._ask_upstream(query, transport)
        except UpstreamError as error:
            self._count("upstream_errors")
            log.warning("dns upstream failed", extra={"fields": {"name": name, "qtype": qtype, "error": str(error)}})
            return _reply_with_rcode(query, dns.rcode.SERVFAIL), QueryRecord(name, qtype, True, (), "SERVFAIL")
        learned = answer_addresses(response, question.name) if response is not None else []
        while True:
            try:
                refused = self.table.learn(learned, epoch=epoch)
                break
            except StalePolicy:
                # Narrowed while upstream answered: this answer may not open anything the new policy denies.
                self._count("rejudged")
                policy, current = self._policy_state
                if current == epoch:  # the table moved on but nobody told this resolver: nothing valid to learn under
                    log.error("the allow table's policy epoch is ahead of the resolver's", extra={"fields": {"name": name}})
                    return _reply_with_rcode(query, dns.rcode.SERVFAIL), QueryRecord(name, qtype, True, (), "SERVFAIL")
                epoch = current
                if not policy.allows(question.name.to_text()):
                    self._count("denied")
                    return _reply_with_rcode(query, dns.rcode.NXDOMAIN), QueryRecord(name, qtype, False, (), "NXDOMAIN")
            except Exception:  # the kernel map refused: replying would hand out an address that cannot be reached
                self._count("allow_errors")
                log.exception("allowing resolved addresses failed", extra={"fields": {"name": name}})
                return _reply_with_rcode(query, dns.rcode.SERVFAIL), QueryRecord(name, qtype, True, (), "SERVFAIL")
        reply = query.id.to_bytes(2, "big") + response_wire[2:]
        if transport == "udp" and len(reply) > _client_udp_limit(query):
            reply = _truncated_reply(query)
        rcode = response.rcode() if response is not None else dns.rcode.Rcode(reply[3] & 0x0F)
        addresses = tuple(address for address, _ttl in learned)
        return reply, QueryRecord(name, qtype, True, addresses, dns.rcode.to_text(rcode), tuple(refused))

    def _ask_upstream(self, query: dns.message.Message, transport: str) -> tuple[bytes, dns.message.Message | None]:
        """Upstream's reply to a clean copy of the query (question, RD/CD/AD, EDNS payload and DO only).

        Rebuilding the query instead of relaying the client's bytes means nothing but the allowed name
        reaches upstream: no EDNS options, no records smuggled in the other sections.
        """
        question = query.question[0]
        use_edns = query.edns >= 0
        upstream_query = dns.message.make_query(
            question.name,
            question.rdtype,
            question.rdclass,
            use_edns=0 if use_edns else False,
            want_dnssec=bool(use_edns and query.ednsflags & dns.flags.DO),
            payload=min(_client_udp_limit(query), MAX_UPSTREAM_PAYLOAD),
            flags=query.flags & (dns.flags.RD | dns.flags.CD | dns.flags.AD),
        )
        outgoing = upstream_query.to_wire()
        errors: list[str] = []
        for _attempt in range(2):
            try:
                if transport == "tcp":
                    response_wire = self._exchange_tcp(outgoing)
                else:
                    response_wire = self._exchange_udp(outgoing, upstream_query)
            except (OSError, UpstreamError) as error:
                errors.append(str(error) or type(error).__name__)
                continue
            try:
                response = dns.message.from_wire(response_wire)
            except Exception as error:
                if len(response_wire) >= HEADER_LENGTH and response_wire[2] & 0x02:
                    return response_wire, None  # truncated mid-record: pass the TC bit on, learn nothing
                errors.append(f"unparseable reply: {error}")
                continue
            if not upstream_query.is_response(response):
                errors.append("reply does not match the query")
                continue
            return response_wire, response
        raise UpstreamError("; ".join(errors))

    def _exchange_udp(self, outgoing: bytes, upstream_query: dns.message.Message) -> bytes:
        deadline = time.monotonic() + self.timeout
        with socket.socket(_family(self.upstream[0]), socket.SOCK_DGRAM) as sock:
            sock.connect(self.upstream)  # only the upstream's datagrams are delivered to this socket
            sock.send(outgoing)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamError(f"no reply within {self.timeout}s")
                sock.settimeout(remaining)
                try:
                    response_wire = sock.recv(65535)
                except TimeoutError as error:
                    raise UpstreamError(f"no reply within {self.timeout}s") from error
                # The socket is connected and fresh, but anything can be sent from upstream's address:
                # only a datagram carrying this query's random id is taken as the answer.
                if len(response_wire) >= 2 and response_wire[:2] == upstream_query.id.to_bytes(2, "big"):
                    return response_wire

    def _exchange_tcp(self, outgoing: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        with socket.create_connection(self.upstream, timeout=self.timeout) as sock:
            sock.sendall(struct.pack("!H", len(outgoing)) + outgoing)
            prefix = _receive_exactly(sock, 2, deadline)
            if prefix is None:
                raise UpstreamError("upstream closed the connection")
            (length,) = struct.unpack("!H", prefix)
            response_wire = _receive_exactly(sock, length, deadline)
            if response_wire is None:
                raise UpstreamError("upstream closed the connection mid-reply")
            return response_wire


def answer_addresses(response: dns.message.Message, queried: dns.name.Name) -> list[tuple[str, int]]:
    """(address, TTL) of every A/AAAA in the answer section on the CNAME chain starting at the queried name."""
    chain = {queried}
    current = queried
    for _hop in range(MAX_CNAME_HOPS):
        alias = next(
            (rrset for rrset in response.answer if rrset.rdtype == dns.rdatatype.CNAME and rrset.name == current and len(rrset)),
            None,
        )
        if alias is None:
            break
        current = alias[0].target
        if current in chain:
            break
        chain.add(current)
    addresses: list[tuple[str, int]] = []
    for rrset in response.answer:
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and rrset.name in chain:
            addresses.extend((rdata.address, rrset.ttl) for rdata in rrset)
    return addresses


def _client_udp_limit(query: dns.message.Message) -> int:
    return max(CLASSIC_UDP_LIMIT, query.payload) if query.edns >= 0 else CLASSIC_UDP_LIMIT


def _reply_with_rcode(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query, recursion_available=True)
    response.set_rcode(rcode)
    return response.to_wire()


def _truncated_reply(query: dns.message.Message) -> bytes:
    """Upstream answered beyond what the client takes over UDP: TC with the question only sends it to TCP."""
    response = dns.message.make_response(query, recursion_available=True)
    response.flags |= dns.flags.TC
    return response.to_wire()


def _header_only_reply(wire: bytes, rcode: int) -> bytes | None:
    """A reply built from the 12-byte header alone, for queries too broken to parse (RFC 1035 FORMERR)."""
    if len(wire) < HEADER_LENGTH:
        return None
    opcode_and_rd = wire[2] & 0x79  # the query's opcode and RD bits, under QR
    return wire[:2] + bytes([0x80 | opcode_and_rd, 0x80 | (rcode & 0x0F)]) + bytes(8)  # RA and the rcode; no sections


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket] | None:
    """UDP and TCP sockets on (host, port); None when the address is IPv6 and this machine has no IPv6."""
    family = _family(host)
    udp: socket.socket | None = None
    tcp: socket.socket | None = None
    try:
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            for sock in (udp, tcp):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # TIME_WAIT from a previous daemon must not keep the TCP port; UDP gets no such option, so no
        # second process can bind the resolver's port alongside it.
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((host, port))
        tcp.bind((host, udp.getsockname()[1]))
        tcp.listen(64)
        return udp, tcp
    except OSError as error:
        for opened in (udp, tcp):
            if opened is not None:
                opened.close()
        if family == socket.AF_INET6 and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            log.warning("IPv6 listen address unavailable; serving without it", extra={"fields": {"address": host}})
            return None
        raise


def _receive_exactly(sock: socket.socket, length: int, deadline: float | None = None) -> bytes | None:
    """Exactly `length` bytes, or None if the peer closed first; a deadline bounds the whole read."""
    chunks: list[bytes] = []
    received = 0
    while received < length:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError("upstream reply timed out")
            sock.settimeout(remaining)
        chunk = sock.recv(length - received)
        if not chunk:
            return None
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
