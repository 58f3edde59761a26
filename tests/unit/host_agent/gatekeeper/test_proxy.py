"""The egress forwarder on loopback: which connections reach a backend, which are refused, and where they go.

Backends, clients and a tiny DNS server all live on 127.0.0.1 (and 127.0.0.2, to tell two backends on
one port apart); the gate's "original destination" is whatever the test says it is.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from host_agent.gatekeeper.allow_table import never_learned
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.proxy import MAX_FIRST_BYTES, L7Proxy, ProxyDecision, UpstreamAnswerError, upstream_resolve

TIMEOUT = 5.0


# ---- backends and clients -------------------------------------------------------------------------


class Backend:
    """A TCP server on one loopback address, serving each connection with `handler` in its own thread."""

    def __init__(self, handler: Callable[[Backend, socket.socket], None], host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.listener = socket.create_server((host, port))
        self.listener.settimeout(0.05)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.received: list[bytes] = []
        self.release = threading.Event()  # for handlers that hold their connection open
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self._stop.set()
        self._thread.join()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _peer = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(TIMEOUT)
            try:
                self.handler(self, connection)
            except OSError:
                pass


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_all(connection: socket.socket) -> bytes:
    """Everything until the peer closes; a reset ends the stream too (a refused connection may be reset)."""
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def http_reply(label: str) -> Callable[[Backend, socket.socket], None]:
    """A handler answering one request with `<label> got Host <host>`, so a reply says who served it."""

    def handle(backend: Backend, connection: socket.socket) -> None:
        head = read_until(connection, b"\r\n\r\n")
        backend.received.append(head)
        host = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"host:")), b"")
        body = f"{label} got Host {host.decode()}".encode()
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    return handle


def upload_then_reply(backend: Backend, connection: socket.socket) -> None:
    """Read until the client's EOF, then reply with a large body: only works if half-close is carried through."""
    received = read_all(connection)
    backend.received.append(received)
    connection.sendall(b"received %d bytes\n" % len(received) + b"r" * 1_000_000)


def banner_first(backend: Backend, connection: socket.socket) -> None:
    """Send a reply and EOF at once, then keep reading what the client still sends."""
    read_until(connection, b"\r\n\r\n")
    connection.sendall(b"banner and done\n")
    connection.shutdown(socket.SHUT_WR)
    backend.received.append(read_all(connection))


def hold_open(backend: Backend, connection: socket.socket) -> None:
    read_until(connection, b"\r\n\r\n")
    backend.release.wait(TIMEOUT)


def request(host: str, *, line: str = "GET / HTTP/1.1", extra: str = "") -> bytes:
    return f"{line}\r\nHost: {host}\r\n{extra}\r\n".encode()


def exchange(port: int, payload: bytes, *, shut_write: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(payload)
        if shut_write:
            client.shutdown(socket.SHUT_WR)
        return read_all(client)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- the proxy's surroundings ---------------------------------------------------------------------


@dataclass
class World:
    """What the proxy asks about: the allowlist, the gate's original destination, DNS. Tests change it freely."""

    policy: NamePolicy
    original: tuple[str, int] | None
    addresses: dict[str, list[str]]
    decisions: list[ProxyDecision] = field(default_factory=list)
    lookups: list[tuple[socket.AddressFamily, int]] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)

    def original_destination(self, family: socket.AddressFamily, client_port: int) -> tuple[str, int] | None:
        self.lookups.append((family, client_port))
        return self.original

    def resolve(self, name: str) -> list[str]:
        self.resolved.append(name)
        return list(self.addresses.get(name.lower(), []))

    def proxy(self, **overrides: object) -> L7Proxy:
        arguments: dict[str, object] = {
            "policy": lambda: self.policy,
            "original_destination": self.original_destination,
            "resolve": self.resolve,
            "on_decision": self.decisions.append,
            "first_bytes_timeout": 2.0,
            "connect_timeout": 2.0,
            "forbidden_target": lambda address: False,  # the backends here listen on loopback
        }
        arguments.update(overrides)
        return L7Proxy(**arguments)  # type: ignore[arg-type]

    def verdicts(self) -> list[tuple[str, str]]:
        return [(decision.verdict, decision.reason) for decision in self.decisions]


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend(http_reply("backend"))
    yield server
    server.close()


@pytest.fixture
def world(backend: Backend) -> World:
    return World(
        policy=NamePolicy.from_lists([".allowed.test"], ["exact.test"]),
        original=("127.0.0.1", backend.port),
        addresses={
            "allowed.test": ["127.0.0.1"],
            "www.allowed.test": ["127.0.0.1"],
            "exact.test": ["127.0.0.1"],
            "evil.test": ["127.0.0.1"],  # resolvable: only the allowlist keeps it out
            "later.test": ["127.0.0.1"],
        },
    )


@pytest.fixture
def proxies() -> Iterator[list[L7Proxy]]:
    started: list[L7Proxy] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(world: World, proxies: list[L7Proxy]) -> L7Proxy:
    return start(world.proxy(), proxies)


def start(proxy: L7Proxy, proxies: list[L7Proxy]) -> L7Proxy:
    proxy.start()
    proxies.append(proxy)
    return proxy


# ---- HTTP -----------------------------------------------------------------------------------------


def test_an_allowed_host_reaches_the_backend(proxy: L7Proxy, world: World, backend: Backend) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as client:
        client.sendall(request("WWW.Allowed.Test:8080"))
        reply = read_all(client)
        client_port = client.getsockname()[1]
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert reply.endswith(b"backend got Host WWW.Allowed.Test:8080")
    assert backend.received == [request("WWW.Allowed.Test:8080")]  # forwarded byte for byte
    assert world.lookups == [(socket.AF_INET, client_port)]
    assert world.resolved == ["WWW.Allowed.Test"]
    assert world.decisions == [
        ProxyDecision(
            "allow", "http", "WWW.Allowed.Test", ("127.0.0.1", backend.port), ("127.0.0.1", backend.port), "in allowlist"
        )
    ]


def test_a_host_not_in_the_allowlist_gets_403_and_never_reaches_anything(proxy: L7Proxy, world: World, backend: Backend) -> None:
    reply = exchange(proxy.port, request("evil.test"))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Connection: close" in head
    assert body == b"km egress proxy: evil.test is not in this sandbox's allowlist.\n"
    assert backend.accepted == 0
    assert world.resolved == []  # a denied name is not even looked up
    assert world.decisions == [ProxyDecision("deny", "http", "evil.test", ("127.0.0.1", backend.port), None, "not in allowlist")]


def test_a_request_body_sent_with_a_denied_request_does_not_lose_the_403(proxy: L7Proxy) -> None:
    body = b"x" * 300_000
    reply = exchange(proxy.port, request("evil.test", line="POST / HTTP/1.1", extra=f"Content-Length: {len(body)}\r\n") + body)
    assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (request("127.0.0.1"), "IP literal; names only"),
        (request("[::1]:80"), "IP literal; names only"),
        (request("allowed.test:443", line="CONNECT allowed.test:443 HTTP/1.1"), "CONNECT not supported"),
        (request("allowed.test", extra="Host: evil.test\r\n"), "conflicting Host headers"),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "no Host header"),
        (request("allowed.test", line="GET http://evil.test/ HTTP/1.1"), "Host header does not match the request target"),
    ],
)
def test_refused_http_requests_get_403_with_the_reason(
    proxy: L7Proxy, world: World, backend: Backend, payload: bytes, reason: str
) -> None:
    reply = exchange(proxy.port, payload)
    assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert reason.encode() in reply
    assert world.verdicts() == [("deny", reason)]
    assert backend.accepted == 0


def test_the_original_address_is_not_used_unless_the_name_resolves_to_it(world: World, proxies: list[L7Proxy]) -> None:
    """The gate says 127.0.0.2, the name says 127.0.0.1: the name wins, so a Host cannot open a way anywhere."""
    near = Backend(http_reply("127.0.0.1"), "127.0.0.1")
    far = Backend(http_reply("127.0.0.2"), "127.0.0.2", near.port)
    try:
        proxy = start(world.proxy(), proxies)
        world.original = ("127.0.0.2", near.port)
        reply = exchange(proxy.port, request("allowed.test"))
        assert reply.endswith(b"127.0.0.1 got Host allowed.test")
        assert far.accepted == 0
        assert world.decisions[-1].target == ("127.0.0.1", near.port)
        assert world.decisions[-1].reason.startswith("in allowlist; original address is not the name's")

        world.addresses["allowed.test"] = ["127.0.0.1", "127.0.0.2"]  # now the client's pick is one of the name's
        reply = exchange(proxy.port, request("allowed.test"))
        assert reply.endswith(b"127.0.0.2 got Host allowed.test")
        assert world.decisions[-1].target == ("127.0.0.2", near.port)
    finally:
        near.close()
        far.close()


def test_the_original_port_is_always_used(world: World, proxy: L7Proxy) -> None:
    other = Backend(http_reply("other port"))
    try:
        world.original = ("127.0.0.2", other.port)  # an address the name does not have, the port it must keep
        assert exchange(proxy.port, request("allowed.test")).endswith(b"other port got Host allowed.test")
    finally:
        other.close()


def test_a_name_resolving_to_loopback_or_instance_metadata_is_refused_by_default(world: World, proxies: list[L7Proxy]) -> None:
    """The forwarder is root and ungated: DNS must not be able to point it at the machine or its metadata."""
    world.addresses["allowed.test"] = ["127.0.0.1", "169.254.169.254", "::ffff:127.0.0.1"]
    proxy = start(world.proxy(forbidden_target=never_learned), proxies)

    reply = exchange(proxy.port, request("allowed.test"))

    assert reply.startswith(b"HTTP/1.1 403")
    assert world.verdicts() == [("deny", "name resolved only to forbidden addresses")]


def test_a_name_that_does_not_resolve_gets_502(proxy: L7Proxy, world: World) -> None:
    world.addresses["allowed.test"] = []
    reply = exchange(proxy.port, request("allowed.test"))
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert world.verdicts() == [("deny", "name did not resolve")]


def test_a_failing_resolver_is_an_error_not_a_crash(world: World, proxies: list[L7Proxy], backend: Backend) -> None:
    def broken(name: str) -> list[str]:
        raise OSError("upstream unreachable")

    proxy = start(world.proxy(resolve=broken), proxies)
    assert exchange(proxy.port, request("allowed.test")).startswith(b"HTTP/1.1 502 ")
    assert world.verdicts() == [("error", "name resolution failed: upstream unreachable")]
    assert backend.accepted == 0


def test_a_refused_upstream_connect_gets_502(proxy: L7Proxy, world: World) -> None:
    with socket.socket() as placeholder:  # a port nobody listens on once this closes
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    world.original = ("127.0.0.1", closed_port)
    reply = exchange(proxy.port, request("allowed.test"))
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    [decision] = world.decisions
    assert decision.verdict == "error" and decision.reason.startswith("upstream connect failed: ")
    assert decision.target is None
    wait_for(lambda: proxy.stats()["open"] == 0, "the connection to close")
    assert proxy.stats() == {"allowed": 0, "denied": 0, "errors": 1, "open": 0}


def test_no_original_destination_is_refused(proxy: L7Proxy, world: World, backend: Backend) -> None:
    world.original = None
    assert exchange(proxy.port, request("allowed.test")) == b""
    assert world.decisions == [ProxyDecision("deny", "unknown", None, None, None, "no original destination")]
    assert backend.accepted == 0


def test_a_policy_reload_applies_to_the_next_connection(proxy: L7Proxy, world: World) -> None:
    assert exchange(proxy.port, request("later.test")).startswith(b"HTTP/1.1 403 ")
    world.policy = NamePolicy.from_lists(["later.test"], [])
    assert exchange(proxy.port, request("later.test")).endswith(b"backend got Host later.test")
    assert exchange(proxy.port, request("allowed.test")).startswith(b"HTTP/1.1 403 ")  # the old list is gone
    assert [verdict for verdict, _reason in world.verdicts()] == ["deny", "allow", "deny"]


def test_a_request_arriving_in_pieces_is_waited_for(proxy: L7Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as client:
        for piece in (b"GE", b"T / HTTP/1.1\r\nHo", b"st: allowed.te", b"st\r\n", b"\r\n"):
            client.sendall(piece)
            time.sleep(0.05)
        assert read_all(client).endswith(b"backend got Host allowed.test")


# ---- half-close -----------------------------------------------------------------------------------


def test_a_client_half_close_reaches_the_backend_and_the_reply_still_comes(world: World, proxies: list[L7Proxy]) -> None:
    backend = Backend(upload_then_reply)
    try:
        world.original = ("127.0.0.1", backend.port)
        proxy = start(world.proxy(), proxies)
        upload = request("allowed.test", line="POST /upload HTTP/1.1") + b"u" * 200_000
        reply = exchange(proxy.port, upload, shut_write=True)
        assert backend.received == [upload]
        assert reply == b"received %d bytes\n" % len(upload) + b"r" * 1_000_000
    finally:
        backend.close()


def test_a_backend_half_close_still_lets_the_client_send(world: World, proxies: list[L7Proxy]) -> None:
    backend = Backend(banner_first)
    try:
        world.original = ("127.0.0.1", backend.port)
        proxy = start(world.proxy(), proxies)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as client:
            client.sendall(request("allowed.test"))
            assert read_all(client) == b"banner and done\n"  # the backend's EOF arrived…
            client.sendall(b"still talking")  # …and this direction still works
            client.shutdown(socket.SHUT_WR)
            wait_for(lambda: backend.received == [b"still talking"], "the backend to read the client's last bytes")
    finally:
        backend.close()


# ---- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for allowed.test, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=allowed.test",
         "-addext", "subjectAltName=DNS:allowed.test", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_backend(certificate: tuple[Path, Path]) -> Iterator[Backend]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)

    def handle(backend: Backend, connection: socket.socket) -> None:
        with context.wrap_socket(connection, server_side=True) as tls:
            message = tls.recv(1024)
            backend.received.append(message)
            tls.sendall(b"tls backend got " + message)

    server = Backend(handle)
    yield server
    server.close()


def tls_client(port: int, server_hostname: str | None, cafile: Path | None) -> bytes:
    """Send `ping` over TLS through the proxy and return the reply; verifies the server when cafile is given."""
    if cafile is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            return read_all(tls)


def test_tls_with_an_allowed_sni_goes_through_untouched(
    world: World, proxy: L7Proxy, tls_backend: Backend, certificate: tuple[Path, Path]
) -> None:
    world.original = ("127.0.0.1", tls_backend.port)
    assert tls_client(proxy.port, "allowed.test", certificate[0]) == b"tls backend got ping"  # the backend's own certificate
    assert tls_backend.received == [b"ping"]
    assert world.decisions == [
        ProxyDecision(
            "allow", "tls", "allowed.test", ("127.0.0.1", tls_backend.port), ("127.0.0.1", tls_backend.port), "in allowlist"
        )
    ]


@pytest.mark.parametrize(
    ("server_hostname", "name", "reason"), [("evil.test", "evil.test", "not in allowlist"), (None, None, "no SNI")]
)
def test_tls_without_an_allowed_sni_is_closed_without_data(
    world: World, proxy: L7Proxy, tls_backend: Backend, server_hostname: str | None, name: str | None, reason: str
) -> None:
    world.original = ("127.0.0.1", tls_backend.port)
    with pytest.raises(OSError):  # SSLError (EOF in violation of the protocol) or a reset, both OSErrors
        tls_client(proxy.port, server_hostname, None)
    assert tls_backend.accepted == 0
    assert world.decisions == [ProxyDecision("deny", "tls", name, ("127.0.0.1", tls_backend.port), None, reason)]


# ---- refusing what is not TLS or HTTP ------------------------------------------------------------


def test_other_protocols_and_garbage_are_closed(proxy: L7Proxy, world: World, backend: Backend) -> None:
    rng = random.Random(5)
    payloads = [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x00\x00\x00"] + [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))) for _ in range(30)
    ]
    payloads = [payload for payload in payloads if payload[0] != 0x16]  # random TLS-looking bytes would wait for more
    for payload in payloads:
        assert exchange(proxy.port, payload) == b""
    assert {verdict for verdict in world.verdicts()} == {("deny", "neither TLS nor HTTP")}
    assert len(world.decisions) == len(payloads)
    assert backend.accepted == 0
    assert exchange(proxy.port, request("allowed.test")).endswith(b"backend got Host allowed.test")  # still serving


def test_silence_times_out(world: World, proxies: list[L7Proxy]) -> None:
    proxy = start(world.proxy(first_bytes_timeout=0.3), proxies)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: allowed.te")  # a beginning, never finished
        assert read_all(client) == b""
    assert 0.25 < time.monotonic() - started < 3
    assert world.verdicts() == [("deny", "timeout waiting for first bytes")]


def test_a_head_larger_than_the_first_bytes_cap_is_refused(proxy: L7Proxy, world: World, backend: Backend) -> None:
    payload = b"GET /" + b"a" * (MAX_FIRST_BYTES + 1000)
    assert exchange(proxy.port, payload) == b""
    assert world.verdicts() == [("deny", f"no name in the first {MAX_FIRST_BYTES} bytes")]
    assert backend.accepted == 0


def test_a_client_that_leaves_early_is_one_decision(proxy: L7Proxy, world: World) -> None:
    assert exchange(proxy.port, b"GET / HTTP/1.1\r\n", shut_write=True) == b""
    assert world.verdicts() == [("deny", "connection closed before a name was sent")]


# ---- lifecycle, counting, load --------------------------------------------------------------------


def test_stats_and_decisions_count_every_connection(proxy: L7Proxy, world: World) -> None:
    def broken_callback(decision: ProxyDecision) -> None:
        raise RuntimeError("audit log is down")

    for payload in (request("allowed.test"), request("exact.test"), request("evil.test"), request("127.0.0.1"), b"\x00junk"):
        exchange(proxy.port, payload)
    world.original = None
    exchange(proxy.port, request("allowed.test"))
    wait_for(lambda: proxy.stats()["open"] == 0, "connections to close")
    assert proxy.stats() == {"allowed": 2, "denied": 4, "errors": 0, "open": 0}
    assert [verdict for verdict, _reason in world.verdicts()] == ["allow", "allow", "deny", "deny", "deny", "deny"]

    proxy.on_decision = broken_callback  # a failing callback costs nothing but its own report
    world.original = world.decisions[0].original
    assert exchange(proxy.port, request("allowed.test")).endswith(b"backend got Host allowed.test")
    wait_for(lambda: proxy.stats()["open"] == 0, "connections to close")
    assert proxy.stats()["allowed"] == 3


def test_many_connections_at_once(proxy: L7Proxy, world: World, backend: Backend) -> None:
    world.addresses.update({f"n{index}.allowed.test": ["127.0.0.1"] for index in range(150)})
    clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) for _ in range(150)]
    try:
        for index, client in enumerate(clients):
            client.sendall(request(f"n{index}.allowed.test"))
        wait_for(lambda: proxy.stats()["open"] == 150, "all 150 connections to be open at once")
        replies = [read_all(client) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert all(reply.endswith(f"backend got Host n{index}.allowed.test".encode()) for index, reply in enumerate(replies))
    assert backend.accepted == 150
    assert proxy.stats()["allowed"] == 150


def test_every_listen_address_shares_one_port(world: World, proxies: list[L7Proxy]) -> None:
    proxy = start(world.proxy(listen=[("127.0.0.1", 0), ("127.0.0.2", 0)]), proxies)
    for address in ("127.0.0.1", "127.0.0.2"):
        with socket.create_connection((address, proxy.port), timeout=TIMEOUT) as client:
            client.sendall(request("allowed.test"))
            assert read_all(client).endswith(b"backend got Host allowed.test")


def test_lifecycle(world: World, proxies: list[L7Proxy]) -> None:
    proxy = world.proxy()
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.port
    start(proxy, proxies)
    with pytest.raises(RuntimeError, match="already started"):
        proxy.start()
    port = proxy.port
    proxy.stop()
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_stop_closes_open_connections(world: World, proxies: list[L7Proxy]) -> None:
    backend = Backend(hold_open)
    try:
        world.original = ("127.0.0.1", backend.port)
        proxy = start(world.proxy(), proxies)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as client:
            client.sendall(request("allowed.test"))
            wait_for(lambda: proxy.stats() == {"allowed": 1, "denied": 0, "errors": 0, "open": 1}, "the connection to be relayed")
            started = time.monotonic()
            proxy.stop()
            assert read_all(client) == b""
            assert time.monotonic() - started < 2
        assert proxy.stats()["open"] == 0
    finally:
        backend.close()


def test_a_connection_cut_before_its_decision_is_reported_once(world: World, proxies: list[L7Proxy]) -> None:
    proxy = start(world.proxy(first_bytes_timeout=30), proxies)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT):
        wait_for(lambda: proxy.stats()["open"] == 1, "the connection to be accepted")
        proxy.stop()
    assert world.verdicts() == [("error", "proxy stopped")]


# ---- upstream_resolve against a tiny DNS server ---------------------------------------------------


def _rrset(name: str, rdtype: str, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, 60, "IN", rdtype, *values)


ZONE: dict[tuple[str, str], list[dns.rrset.RRset]] = {
    ("both.test.", "A"): [_rrset("both.test.", "A", "192.0.2.10", "192.0.2.11")],
    ("both.test.", "AAAA"): [_rrset("both.test.", "AAAA", "2001:db8::10")],
    ("v4only.test.", "A"): [_rrset("v4only.test.", "A", "192.0.2.20")],
    ("alias.test.", "A"): [_rrset("alias.test.", "CNAME", "both.test."), _rrset("both.test.", "A", "192.0.2.10")],
    ("alias.test.", "AAAA"): [_rrset("alias.test.", "CNAME", "both.test."), _rrset("both.test.", "AAAA", "2001:db8::10")],
    ("junk.test.", "A"): [_rrset("junk.test.", "A", "192.0.2.30"), _rrset("other.test.", "A", "192.0.2.66")],
    ("big.test.", "A"): [_rrset("big.test.", "A", *(f"192.0.2.{index}" for index in range(100, 200)))],
}
SERVFAIL_NAMES = {"broken.test."}


class TinyDns:
    """A DNS server on 127.0.0.1 (UDP and TCP, one port) answering from ZONE; big answers are truncated over UDP."""

    def __init__(self) -> None:
        self.udp, self.tcp = self._bind_pair()
        self.port: int = self.udp.getsockname()[1]
        self.questions: list[tuple[str, str, str]] = []
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.05)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=serve, daemon=True) for serve in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """UDP and TCP on one port: the UDP port chosen may be in use for TCP (an outgoing connection), so retry."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            try:
                return udp, socket.create_server(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.udp.close()
        self.tcp.close()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            self.udp.sendto(self._answer(wire, "udp"), client)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _peer = self.tcp.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(TIMEOUT)
                prefix = read_exactly(connection, 2)
                reply = self._answer(read_exactly(connection, struct.unpack("!H", prefix)[0]), "tcp")
                connection.sendall(struct.pack("!H", len(reply)) + reply)

    def _answer(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        self.questions.append((name, rdtype, transport))
        response = dns.message.make_response(query, recursion_available=True)
        if name in SERVFAIL_NAMES:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not any(known == name for known, _type in ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer.extend(ZONE.get((name, rdtype), []))
        full = response.to_wire()
        if transport == "udp" and len(full) > 512:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()
        return full


def read_exactly(connection: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        if not chunk:
            raise ConnectionError("closed mid-message")
        data += chunk
    return data


@pytest.fixture
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("both.test", ["192.0.2.10", "192.0.2.11", "2001:db8::10"]),
        ("BOTH.test.", ["192.0.2.10", "192.0.2.11", "2001:db8::10"]),
        ("v4only.test", ["192.0.2.20"]),  # AAAA: no data, not an error
        ("alias.test", ["192.0.2.10", "2001:db8::10"]),  # through the CNAME the server followed
        ("junk.test", ["192.0.2.30"]),  # a record for another name in the answer is not the name's
        ("missing.test", []),
    ],
)
def test_upstream_resolve_asks_for_a_and_aaaa(tiny_dns: TinyDns, name: str, expected: list[str]) -> None:
    assert sorted(upstream_resolve(("127.0.0.1", tiny_dns.port))(name)) == expected  # a record set has no order


def test_upstream_resolve_stops_at_nxdomain(tiny_dns: TinyDns) -> None:
    assert upstream_resolve(("127.0.0.1", tiny_dns.port))("missing.test") == []
    assert tiny_dns.questions == [("missing.test.", "A", "udp")]


def test_upstream_resolve_retries_a_truncated_answer_over_tcp(tiny_dns: TinyDns) -> None:
    assert set(upstream_resolve(("127.0.0.1", tiny_dns.port))("big.test")) == {f"192.0.2.{index}" for index in range(100, 200)}
    assert ("big.test.", "A", "tcp") in tiny_dns.questions


def test_upstream_resolve_raises_on_failure(tiny_dns: TinyDns) -> None:
    with pytest.raises(UpstreamAnswerError, match="SERVFAIL"):
        upstream_resolve(("127.0.0.1", tiny_dns.port))("broken.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(dns.exception.Timeout):
            upstream_resolve(("127.0.0.1", silent.getsockname()[1]), timeout=0.2)("both.test")
    with pytest.raises(ValueError):
        upstream_resolve(("dns.example", 53))


def test_the_proxy_forwards_with_upstream_resolve(
    world: World, proxies: list[L7Proxy], tiny_dns: TinyDns, backend: Backend
) -> None:
    ZONE[("local.allowed.test.", "A")] = [_rrset("local.allowed.test.", "A", "127.0.0.1")]
    try:
        proxy = start(world.proxy(resolve=upstream_resolve(("127.0.0.1", tiny_dns.port))), proxies)
        world.original = ("127.0.0.2", backend.port)  # not the name's address: the DNS answer decides
        assert exchange(proxy.port, request("local.allowed.test")).endswith(b"backend got Host local.allowed.test")
        assert world.decisions[-1].target == ("127.0.0.1", backend.port)
    finally:
        del ZONE[("local.allowed.test.", "A")]
