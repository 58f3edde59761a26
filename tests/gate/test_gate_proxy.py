"""The proxy enforcement modes, end to end in the harness: the real gate sends a gated child's TCP to the
real L7 forwarder, which finds the original destination through the sock_ops map and decides by Host/SNI.

The lab's TCP servers answer `<their address>|<what they got>`, so each test sees which server, if any,
the forwarder really reached. Only the forwarder's name lookups are a table here (what upstream DNS
would answer); everything else is the real thing.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator

import pytest

from ebpf.gate import EgressGate
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.proxy import L7Proxy, ProxyDecision
from tests.gate.conftest import (
    ALLOWED_V4,
    ALLOWED_V6,
    DENIED_V4,
    IN_CIDR_V4,
    SERVICE_PORT,
    GateCgroup,
    MakeGate,
    Spawn,
)

pytestmark = pytest.mark.root

# What upstream DNS would say for the names the tests send.
NAMES = {"allowed.test": [ALLOWED_V4, ALLOWED_V6], "api.allowed.test": [ALLOWED_V4]}


def http_request(host: str) -> str:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kmgate-test\r\n\r\n"


def client_hello(server_name: str) -> str:
    """A real TLS ClientHello for this SNI, as hex for the child to send."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read().hex()


class Forwarder:
    """The L7 forwarder on loopback (this test process is not gated, like the daemon), and what it decided."""

    def __init__(self) -> None:
        self.decisions: list[ProxyDecision] = []
        self.policy = NamePolicy.from_lists([".allowed.test"], [])
        self.gate: EgressGate | None = None
        self.proxy = L7Proxy(
            policy=lambda: self.policy,
            original_destination=self._original,
            resolve=lambda name: NAMES.get(name.lower().rstrip("."), []),
            listen=(("127.0.0.1", 0), ("::1", 0)),
            on_decision=self.decisions.append,
            first_bytes_timeout=3,
        )

    def _original(self, family: socket.AddressFamily, port: int) -> tuple[str, int] | None:
        return self.gate.proxy_origin(int(family), port) if self.gate else None


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    made = Forwarder()
    made.proxy.start()
    try:
        yield made
    finally:
        made.proxy.stop()


@pytest.fixture
def proxied_gate(make_gate: MakeGate, forwarder: Forwarder, gate_cgroup: GateCgroup) -> Callable[..., EgressGate]:
    def make(enforcement: str = "proxy") -> EgressGate:
        gate = make_gate(
            enforcement=enforcement,
            proxy_v4=("127.0.0.1", forwarder.proxy.port),
            proxy_v6=("::1", forwarder.proxy.port),
        )
        forwarder.gate = gate
        gate.attach(gate_cgroup.path)
        return gate

    return make


def test_an_allowed_host_header_is_forwarded_and_the_peer_is_the_original_destination(
    proxied_gate: Callable[..., EgressGate], forwarder: Forwarder, spawn: Spawn
) -> None:
    gate = proxied_gate()
    child = spawn()

    result = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("api.allowed.test"))

    assert result["reply"].startswith(f"{ALLOWED_V4}|GET / HTTP/1.1")
    assert result["peer"] == [ALLOWED_V4, SERVICE_PORT]  # getpeername() hides the redirect
    assert [d.verdict for d in forwarder.decisions] == ["allow"]
    assert forwarder.decisions[0].original == (ALLOWED_V4, SERVICE_PORT)
    assert gate.counters()["proxied"] == 1


def test_a_host_header_not_in_the_allowlist_gets_403_and_reaches_nothing(
    proxied_gate: Callable[..., EgressGate], forwarder: Forwarder, spawn: Spawn
) -> None:
    proxied_gate()
    child = spawn()

    result = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("evilallowed.test"))

    assert result["reply"].startswith("HTTP/1.1 403")
    assert ALLOWED_V4 not in result["reply"]
    assert [(d.verdict, d.name) for d in forwarder.decisions] == [("deny", "evilallowed.test")]


def test_an_allowed_name_sent_to_another_address_reaches_the_names_address_only(
    proxied_gate: Callable[..., EgressGate], spawn: Spawn
) -> None:
    """Domain fronting to an arbitrary IP: the forwarder connects where the name resolves, not where the client aimed."""
    proxied_gate()
    child = spawn()

    result = child.do("tcp", host=DENIED_V4, port=SERVICE_PORT, payload=http_request("allowed.test"))

    assert result["reply"].startswith(f"{ALLOWED_V4}|")
    assert DENIED_V4 not in result["reply"]


def test_tls_is_decided_by_sni_without_being_decrypted(proxied_gate: Callable[..., EgressGate], spawn: Spawn) -> None:
    proxied_gate()
    child = spawn()

    allowed = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload_hex=client_hello("API.Allowed.Test"))
    denied = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload_hex=client_hello("evil.test"))

    assert allowed["reply"].startswith(f"{ALLOWED_V4}|\x16\x03")  # the ClientHello arrived untouched
    assert denied.get("reply", "") == "" or denied["error"] in ("ECONNRESET", "EPIPE")


def test_ipv6_connections_are_proxied_too(proxied_gate: Callable[..., EgressGate], spawn: Spawn) -> None:
    proxied_gate()
    child = spawn()

    result = child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT, payload=http_request("allowed.test"))

    assert result["reply"].startswith(f"{ALLOWED_V6}|GET")
    assert result["peer"] == [ALLOWED_V6, SERVICE_PORT]


def test_both_mode_refuses_addresses_no_allowed_name_resolved_to(
    proxied_gate: Callable[..., EgressGate], forwarder: Forwarder, spawn: Spawn
) -> None:
    gate = proxied_gate("both")
    gate.allow(ALLOWED_V4)
    child = spawn()

    assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT, payload=http_request("allowed.test"))["error"] == "EPERM"
    forwarded = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("allowed.test"))
    refused = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("evil.test"))

    assert forwarded["reply"].startswith(f"{ALLOWED_V4}|GET")
    assert refused["reply"].startswith("HTTP/1.1 403")  # an allowed address does not make any name allowed
    assert [d.verdict for d in forwarder.decisions] == ["allow", "deny"]


def test_allowed_cidrs_are_reached_directly_without_the_forwarder(
    proxied_gate: Callable[..., EgressGate], forwarder: Forwarder, spawn: Spawn
) -> None:
    gate = proxied_gate("both")
    gate.allow("198.18.77.32/28", static=True)
    child = spawn()

    result = child.do("tcp", host=IN_CIDR_V4, port=SERVICE_PORT, payload="not http at all")

    assert result["reply"] == f"{IN_CIDR_V4}|not http at all"
    assert forwarder.decisions == []


def test_udp_is_never_proxied_and_stays_denied(proxied_gate: Callable[..., EgressGate], spawn: Spawn) -> None:
    proxied_gate()
    child = spawn()

    assert child.do("udp_sendto", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"


@pytest.mark.parametrize("enforcement", ["proxy", "both"])
def test_udp_reaches_allowed_cidrs_only_never_an_address_learned_from_a_name(
    enforcement: str, proxied_gate: Callable[..., EgressGate], spawn: Spawn
) -> None:
    """QUIC to a CDN address carries any name; the forwarder sees no UDP, so in the proxy modes a learned
    address is not enough (DNS is still redirected to the resolver)."""
    gate = proxied_gate(enforcement)
    gate.allow(ALLOWED_V4)
    gate.allow(ALLOWED_V6)
    gate.allow("198.18.77.32/28", static=True)
    child = spawn()

    assert child.do("udp_sendto", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_connect", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_sendto", host=ALLOWED_V6, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_sendto", host=f"::ffff:{ALLOWED_V4}", port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_sendto", host=IN_CIDR_V4, port=SERVICE_PORT)["reply"] == f"{IN_CIDR_V4}|query"
    assert child.do("udp_sendto", host=ALLOWED_V4, port=53)["reply"] == "answer|query"  # the resolver stand-in


def test_in_learn_mode_udp_to_a_learned_address_is_reported_as_would_deny_in_the_proxy_modes(
    make_gate: MakeGate, gate_cgroup: GateCgroup, forwarder: Forwarder, spawn: Spawn
) -> None:
    gate = make_gate(
        mode="log", enforcement="both", proxy_v4=("127.0.0.1", forwarder.proxy.port), proxy_v6=("::1", forwarder.proxy.port)
    )
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)

    assert spawn().do("udp_sendto", host=ALLOWED_V4, port=SERVICE_PORT)["reply"] == f"{ALLOWED_V4}|query"
    assert gate.counters()["would_deny"] == 1


def test_in_ebpf_enforcement_udp_still_reaches_learned_addresses(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate(enforcement="ebpf")
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)

    assert spawn().do("udp_sendto", host=ALLOWED_V4, port=SERVICE_PORT)["reply"] == f"{ALLOWED_V4}|query"


def test_a_policy_reload_applies_to_the_next_connection(
    proxied_gate: Callable[..., EgressGate], forwarder: Forwarder, spawn: Spawn
) -> None:
    proxied_gate()
    child = spawn()
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("allowed.test"))["reply"].startswith(
        f"{ALLOWED_V4}|"
    )

    forwarder.policy = NamePolicy.from_lists(["other.test"], [])

    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, payload=http_request("allowed.test"))["reply"].startswith(
        "HTTP/1.1 403"
    )
