"""The sandbox's L7 egress forwarder: a TCP connection leaves only towards the name it asks for, if allowed.

In the `proxy` and `both` enforcement modes the gate rewrites every TCP connect() of the sandbox to this
forwarder's loopback listener and remembers where the client meant to go. The forwarder reads the
first bytes, finds the name the client asks for (the TLS ClientHello's SNI, or the HTTP/1.x Host) and
checks it against the sandbox's name allowlist. TLS is never terminated: the bytes are only read.

The security rule: name → resolve → connect. An allowed name is resolved by the forwarder itself and
the connection goes to one of *its* addresses, never simply to the original destination, so a client
cannot reach an arbitrary address by sending an allowed name (`Host: github.com` to 203.0.113.9). The
original destination's address is used only when the name resolves to it (keeping the client's choice
among a name's addresses); its port is always used. The rule is about where bytes go, not what a
server does with them: later requests on a kept-alive HTTP connection, or a TLS server hosting other
names (domain fronting), stay on the allowed name's address.

Everything that is not a complete, readable TLS or HTTP request with an allowed name is refused:
no name, an IP literal, CONNECT, two different Host headers, a timeout, bytes of another protocol.
One asyncio loop in one daemon thread serves every connection; nothing a client sends stops it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from host_agent.gatekeeper.allow_table import never_learned
from host_agent.gatekeeper.first_bytes import (
    MAX_FIRST_BYTES,
    NeedMore,
    Request,
    identify_request,
    is_ip_literal,
    unfinished_request,
)
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.resolver import answer_addresses

log = logging.getLogger("km-host-agent.gate.proxy")

RELAY_CHUNK = 65536
MAX_OPEN_CONNECTIONS = 1024  # two descriptors each; beyond this a new connection is refused, not queued
LISTEN_BACKLOG = 512
RESOLVE_WORKERS = 32
REFUSAL_LINGER_SECONDS = 1.0  # read what the client still sends after a refusal, so closing does not reset the reply
CLOSE_SECONDS = 2.0
STOP_SECONDS = 5.0
STAT_NAMES = ("allowed", "denied", "errors")
_STAT_OF_VERDICT = {"allow": "allowed", "deny": "denied", "error": "errors"}


@dataclass(frozen=True)
class ProxyDecision:
    """What the forwarder did with one connection, for the audit log: asked name, where it meant to go, where it went."""

    verdict: str  # "allow" | "deny" | "error"
    protocol: str  # "tls" | "http" | "unknown"
    name: str | None  # the SNI or Host as sent; None when none was found
    original: tuple[str, int] | None  # where the client meant to connect
    target: tuple[str, int] | None  # where the forwarder connected (allow only)
    reason: str


# ---- deciding -------------------------------------------------------------------------------------


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress | None:
    """The address in a canonical form (IPv4-mapped IPv6 as IPv4), or None for anything else."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _target_address(resolved: Sequence[str], original: str) -> str | None:
    """Where to connect: the original address if the name resolves to it, else the name's first of its family.

    None when the name gave no usable address. Never the original address otherwise: that is the rule
    that keeps an allowed name from opening a way to any address.
    """
    addresses = [address for address in (_address(text) for text in resolved) if address is not None]
    if not addresses:
        return None
    wanted = _address(original)
    if wanted in addresses:
        return str(wanted)
    same_family = [address for address in addresses if wanted is not None and address.version == wanted.version]
    return str((same_family or addresses)[0])


def _http_refusal(verdict: str, name: str | None, reason: str) -> bytes:
    """The reply an HTTP client gets instead of its server's: 403 for a refusal, 502 when upstream failed."""
    if verdict == "deny" and reason == "not in allowlist":
        status, body = "403 Forbidden", f"km egress proxy: {name} is not in this sandbox's allowlist.\n"
    elif verdict == "deny" and reason != "name did not resolve":
        status, body = "403 Forbidden", f"km egress proxy: request for {name or 'no host'} refused: {reason}.\n"
    else:
        status, body = "502 Bad Gateway", f"km egress proxy: could not reach {name}: {reason}.\n"
    encoded = body.encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(encoded)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + encoded


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# ---- serving --------------------------------------------------------------------------------------


@dataclass
class _Attempt:
    """What is known so far about one connection; its decision is reported exactly once."""

    protocol: str = "unknown"
    name: str | None = None
    original: tuple[str, int] | None = None
    decided: bool = False


class L7Proxy:
    """Forwards the sandbox's redirected TCP connections to the name they ask for, when the allowlist has it.

    `policy` is called for each connection, so a reload applies to the next one. `original_destination`
    maps (socket family, client port) to where the client meant to connect (None: unknown, refused).
    `resolve` turns an allowed name into addresses; it may block, and runs in worker threads.
    `on_decision` hears about every connection exactly once, on the serving thread; its failures are
    logged and ignored.
    """

    def __init__(
        self,
        *,
        policy: Callable[[], NamePolicy],
        original_destination: Callable[[socket.AddressFamily, int], tuple[str, int] | None],
        resolve: Callable[[str], list[str]],
        listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
        on_decision: Callable[[ProxyDecision], None] | None = None,
        first_bytes_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        forbidden_target: Callable[[IPAddress], bool] = never_learned,
    ) -> None:
        if not listen:
            raise ValueError("the proxy needs at least one listen address")
        self.forbidden_target = forbidden_target
        self.policy = policy
        self.original_destination = original_destination
        self.resolve = resolve
        self.listen = tuple(listen)
        self.on_decision = on_decision
        self.first_bytes_timeout = first_bytes_timeout
        self.connect_timeout = connect_timeout
        self._stats: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._open = 0
        self._stats_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolvers: ThreadPoolExecutor | None = None
        self._stopping = False
        self._port = 0

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port bound by start(); the one chosen for every port-0 listen address."""
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    def start(self) -> None:
        """Bind every listen address and serve from a daemon thread; bind failures raise here."""
        if self._serving is not None:
            raise RuntimeError("the proxy is already started")
        listeners = _bind_listeners(self.listen)
        loop = asyncio.new_event_loop()
        serving = threading.Thread(target=_run_loop, args=(loop,), name="l7-proxy", daemon=True)
        self._stopping = False
        self._resolvers = ThreadPoolExecutor(max_workers=RESOLVE_WORKERS, thread_name_prefix="l7-proxy-resolve")
        serving.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open_servers(listeners), loop).result(timeout=STOP_SECONDS)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            serving.join(timeout=STOP_SECONDS)
            for listener in listeners:
                listener.close()
            self._resolvers.shutdown(wait=False)
            raise
        self._port = listeners[0].getsockname()[1]
        self._loop, self._serving = loop, serving

    def stop(self) -> None:
        """Close the listeners and every open connection, and end the serving thread; safe to call twice."""
        loop, serving = self._loop, self._serving
        if loop is None or serving is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shut_down(), loop).result(timeout=STOP_SECONDS)
        except TimeoutError:
            log.warning("the proxy's connections did not close in time")
        loop.call_soon_threadsafe(loop.stop)
        serving.join(timeout=STOP_SECONDS)
        if self._resolvers is not None:
            self._resolvers.shutdown(wait=False, cancel_futures=True)
        self._loop, self._serving, self._resolvers = None, None, None

    def stats(self) -> dict[str, int]:
        """Connections since start by verdict (allowed, denied, errors), and those open now."""
        with self._stats_lock:
            return {**self._stats, "open": self._open}

    async def _open_servers(self, listeners: list[socket.socket]) -> None:
        self._servers = [await asyncio.start_server(self._serve_client, sock=listener) for listener in listeners]

    async def _shut_down(self) -> None:
        """Stop accepting, then end every connection; a handler not yet running sees `_stopping` and closes."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for _ in range(3):  # let accepted connections' handlers start, so they are cancelled too
            await asyncio.sleep(0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._servers = []

    # ---- one connection ---------------------------------------------------------------------------
    async def _serve_client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Serve one redirected connection to its end; whatever happens, report one decision and close."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._count_open(+1)
        attempt = _Attempt()
        upstream: list[asyncio.StreamWriter] = []
        try:
            await self._forward(attempt, client_reader, client_writer, upstream)
        except asyncio.CancelledError:  # stop(): the end of this task, which nothing but stop() awaits
            self._decide(attempt, "error", "proxy stopped")
        except OSError as error:
            self._decide(attempt, "error", f"connection failed: {_describe(error)}")
        except Exception as error:  # a bug must cost one connection, never the serving loop
            log.exception("l7 proxy connection failed")
            self._decide(attempt, "error", f"internal error: {_describe(error)}")
        finally:
            for writer in [*upstream, client_writer]:
                await self._close(writer)
            self._count_open(-1)
            self._tasks.discard(task)

    async def _forward(
        self,
        attempt: _Attempt,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream: list[asyncio.StreamWriter],
    ) -> None:
        """Decide on the connection and, when allowed, connect to the name's address and relay until both sides end."""
        if self._stopping:
            self._decide(attempt, "error", "proxy stopped")
            return
        if self._open > MAX_OPEN_CONNECTIONS:
            self._decide(attempt, "error", "too many open connections")
            return
        attempt.original = self._original_of(client_writer)
        if attempt.original is None:
            self._decide(attempt, "deny", "no original destination")
            return
        first_bytes, request = await self._read_request(client_reader)
        attempt.protocol, attempt.name = request.protocol, request.name
        if request.problem is not None or request.name is None:
            await self._refuse(attempt, client_reader, client_writer, "deny", request.problem or "no name")
            return
        refusal = self._judge_name(request.name)
        if refusal is not None:
            await self._refuse(attempt, client_reader, client_writer, "deny", refusal)
            return
        target = await self._choose_target(attempt, request.name, client_reader, client_writer)
        if target is None:
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError as error:  # TimeoutError included
            reason = f"timed out after {self.connect_timeout}s" if isinstance(error, TimeoutError) else _describe(error)
            await self._refuse(attempt, client_reader, client_writer, "error", f"upstream connect failed: {reason}")
            return
        upstream.append(upstream_writer)
        original_used = target[0] == str(_address(attempt.original[0]))
        self._decide(
            attempt,
            "allow",
            "in allowlist" if original_used else "in allowlist; original address is not the name's, used the name's",
            target,
        )
        upstream_writer.write(first_bytes)
        await _relay(client_reader, client_writer, upstream_reader, upstream_writer)

    def _original_of(self, client_writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        """Where the gate says the client meant to connect; None when it does not know (or cannot say)."""
        sock = client_writer.get_extra_info("socket")
        peer = client_writer.get_extra_info("peername")
        if sock is None or not peer:
            return None
        try:
            return self.original_destination(socket.AddressFamily(sock.family), int(peer[1]))
        except Exception:
            log.exception("original destination lookup failed")
            return None

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, Request]:
        """The first bytes (at most MAX_FIRST_BYTES) and what they ask for, waiting no longer than the timeout."""
        data = b""
        try:
            async with asyncio.timeout(self.first_bytes_timeout):
                while True:
                    request = identify_request(data)
                    if not isinstance(request, NeedMore):
                        return data, request
                    if len(data) >= MAX_FIRST_BYTES:
                        return data, unfinished_request(data, f"no name in the first {MAX_FIRST_BYTES} bytes")
                    chunk = await reader.read(MAX_FIRST_BYTES - len(data))
                    if not chunk:
                        return data, unfinished_request(data, "connection closed before a name was sent")
                    data += chunk
        except TimeoutError:
            return data, unfinished_request(data, "timeout waiting for first bytes")

    def _judge_name(self, name: str) -> str | None:
        """Why this name may not be reached (None: it may); the policy is read afresh for each connection."""
        if is_ip_literal(name):
            return "IP literal; names only"
        if not self.policy().allows(name):
            return "not in allowlist"
        return None

    async def _choose_target(
        self, attempt: _Attempt, name: str, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> tuple[str, int] | None:
        """The address to connect to, from the name's own addresses; None once the connection is refused."""
        assert attempt.original is not None
        loop = asyncio.get_running_loop()
        try:
            resolved = await loop.run_in_executor(self._resolvers, self.resolve, name)
        except Exception as error:  # any resolver failure (socket, DNS, a bug) refuses this one connection
            await self._refuse(attempt, client_reader, client_writer, "error", f"name resolution failed: {_describe(error)}")
            return None
        # The forwarder is root and ungated: a name pointing at loopback or link-local (instance
        # metadata) must not take the agent there. Such answers count as no answer.
        usable = [text for text in resolved if (parsed := _address(text)) is not None and not self.forbidden_target(parsed)]
        address = _target_address(usable, attempt.original[0])
        if address is None:
            reason = "name resolved only to forbidden addresses" if resolved else "name did not resolve"
            await self._refuse(attempt, client_reader, client_writer, "deny", reason)
            return None
        return address, attempt.original[1]

    async def _refuse(
        self,
        attempt: _Attempt,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        verdict: str,
        reason: str,
    ) -> None:
        """Report the refusal; an HTTP client is told why (TLS and the rest are just closed)."""
        self._decide(attempt, verdict, reason)
        if attempt.protocol != "http":
            return
        client_writer.write(_http_refusal(verdict, attempt.name, reason))
        await client_writer.drain()
        if client_writer.can_write_eof():
            client_writer.write_eof()
        # Closing with unread bytes (a request body) would reset the connection and lose the reply.
        try:
            async with asyncio.timeout(REFUSAL_LINGER_SECONDS):
                while await client_reader.read(RELAY_CHUNK):
                    pass
        except TimeoutError:
            pass

    def _decide(self, attempt: _Attempt, verdict: str, reason: str, target: tuple[str, int] | None = None) -> None:
        """Count and report the connection's decision; only its first decision counts."""
        if attempt.decided:
            return
        attempt.decided = True
        with self._stats_lock:
            self._stats[_STAT_OF_VERDICT[verdict]] += 1
        if self.on_decision is None:
            return
        decision = ProxyDecision(verdict, attempt.protocol, attempt.name, attempt.original, target, reason)
        try:
            self.on_decision(decision)
        except Exception:
            log.exception("on_decision callback failed")

    def _count_open(self, change: int) -> None:
        with self._stats_lock:
            self._open += change

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close once the last bytes are flushed; at once when stopping or when the peer stopped reading."""
        if self._stopping:
            writer.transport.abort()
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)
        except (TimeoutError, OSError):
            writer.transport.abort()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both sides have finished; one side's EOF half-closes the other, an error ends both."""
    both = (client_writer, upstream_writer)
    await asyncio.gather(_pump(client_reader, upstream_writer, both), _pump(upstream_reader, client_writer, both))


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, both: tuple[asyncio.StreamWriter, ...]) -> None:
    try:
        while chunk := await source.read(RELAY_CHUNK):
            sink.write(chunk)
            await sink.drain()
        if not sink.is_closing() and sink.can_write_eof():
            sink.write_eof()
    except OSError:  # a reset on either side: the other direction cannot complete either
        for writer in both:
            writer.transport.abort()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _bind_listeners(listen: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """A listening socket on every address, all on one port when they ask for port 0 (retried if taken)."""
    attempts = 20 if any(port == 0 for _host, port in listen) else 1
    for attempt in range(attempts):
        bound: list[socket.socket] = []
        shared = 0
        try:
            for host, port in listen:
                listener = _listener(host, port or shared)
                if listener is None:
                    continue
                bound.append(listener)
                if port == 0 and not shared:
                    shared = listener.getsockname()[1]
            if not bound:
                raise OSError(errno.EADDRNOTAVAIL, f"no listen address could be bound: {listen}")
            return bound
        except OSError as error:
            for listener in bound:
                listener.close()
            if error.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _listener(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on (host, port); None when the address is IPv6 and this machine has no IPv6."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    listener: socket.socket | None = None
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous daemon
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        return listener
    except OSError as error:
        if listener is not None:
            listener.close()
        if family == socket.AF_INET6 and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            log.warning("IPv6 listen address unavailable; serving without it", extra={"fields": {"address": host}})
            return None
        raise


# ---- resolving ------------------------------------------------------------------------------------


class UpstreamAnswerError(OSError):
    """Upstream answered a lookup with an error (SERVFAIL, REFUSED…): the name's addresses are unknown."""


def upstream_resolve(upstream: tuple[str, int], timeout: float = 2.0) -> Callable[[str], list[str]]:
    """A resolve() asking the upstream DNS server directly for A and AAAA (CNAME chains followed by the server).

    Addresses come from the answer section's chain from the name (as the sandbox's resolver reads
    them); [] for NXDOMAIN or no data. Raises OSError or a dnspython exception when upstream fails.
    The proxy's own lookups bypass the sandbox's resolver: they must not add to the sandbox's allow maps.
    """
    ipaddress.ip_address(upstream[0])  # an IP, not a host name: resolving it would need a resolver

    def resolve(name: str) -> list[str]:
        addresses: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found = _lookup(upstream, name, rdtype, timeout)
            if found is None:  # NXDOMAIN: no other type will exist either
                return []
            addresses.extend(found)
        return addresses

    return resolve


def _lookup(upstream: tuple[str, int], name: str, rdtype: dns.rdatatype.RdataType, timeout: float) -> list[str] | None:
    """The addresses of one type, None for NXDOMAIN; a truncated UDP answer is asked again over TCP."""
    query = dns.message.make_query(dns.name.from_text(name), rdtype)
    response = dns.query.udp(query, upstream[0], port=upstream[1], timeout=timeout)
    if response.flags & dns.flags.TC:
        response = dns.query.tcp(query, upstream[0], port=upstream[1], timeout=timeout)
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return None
    if rcode != dns.rcode.NOERROR:
        raise UpstreamAnswerError(f"upstream {upstream[0]}:{upstream[1]} answered {dns.rcode.to_text(rcode)} for {name}")
    return [address for address, _ttl in answer_addresses(response, query.question[0].name)]
