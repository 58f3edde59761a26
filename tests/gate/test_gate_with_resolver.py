"""The gate and the resolver together, wired as the daemon wires them (host_agent/gatekeeper/component.py):
a name becomes a reachable address only through an allowed DNS answer, and stops being one when it expires
or the allowlist narrows, without cutting connections that are already open.

The resolver runs in the test process (outside the gated cgroup) and forwards to a fake upstream on loopback;
the gated child asks "any server" on port 53 and the gate sends the query to the resolver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from ebpf.gate import EgressGate
from host_agent.gatekeeper.allow_table import AllowTable
from host_agent.gatekeeper.connections import open_remote_addresses
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.resolver import Resolver
from tests.gate.conftest import (
    ALLOWED_V4,
    ALLOWED_V6,
    DENIED_V4,
    DENIED_V6,
    DNS_PORT,
    IN_CIDR_V4,
    NO_SERVER_V4,
    NO_SERVER_V6,
    SERVICE_PORT,
    GateCgroup,
    Lab,
    MakeGate,
)
from tests.gate.resolver_wiring import FakeUpstream, ManualClock, ResolvingChild, free_resolver_port

pytestmark = pytest.mark.root

NXDOMAIN = 3
SHORT_TTL = 5
ZONE = {
    "v6.allowed.test": [("AAAA", ALLOWED_V6, 300)],
    "v4.allowed.test": [("A", ALLOWED_V4, SHORT_TTL)],
    "cidr.allowed.test": [("A", IN_CIDR_V4, SHORT_TTL)],
    # upstream would answer these, so an NXDOMAIN for them can only come from the resolver's policy
    "denied.elsewhere.test": [("AAAA", DENIED_V6, 300), ("A", DENIED_V4, 300)],
}
ALLOWED_SUFFIXES = ["allowed.test"]


@dataclass
class Wiring:
    gate: EgressGate
    table: AllowTable
    resolver: Resolver
    upstream: FakeUpstream
    clock: ManualClock


@pytest.fixture
def wiring(make_gate: MakeGate, gate_cgroup: GateCgroup) -> Iterator[Wiring]:
    """Gate on the test cgroup -> AllowTable(sink=gate) -> Resolver(policy, upstream, table) on 127.0.0.1 and ::1."""
    upstream = FakeUpstream(ZONE)
    port = free_resolver_port()
    gate = make_gate(resolver_v4=("127.0.0.1", port), resolver_v6=("::1", port))
    clock = ManualClock()
    table = AllowTable(gate, floor_seconds=1, clock=clock, is_in_use=open_remote_addresses)
    resolver = Resolver(
        NamePolicy.from_lists(ALLOWED_SUFFIXES, []),
        upstream.address,
        table,
        listen=(("127.0.0.1", port), ("::1", port)),
    )
    resolver.start()
    try:
        assert resolver.port == port
        gate.attach(gate_cgroup.path)
        yield Wiring(gate, table, resolver, upstream, clock)
    finally:
        resolver.stop()
        upstream.stop()


Spawn = Callable[[], ResolvingChild]


@pytest.fixture
def spawn_resolving(gate_cgroup: GateCgroup, lab: Lab) -> Iterator[Spawn]:
    """Gated children that can also send DNS queries; all killed at the end."""
    children: list[ResolvingChild] = []

    def start() -> ResolvingChild:
        child = ResolvingChild(gate_cgroup.path)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.stop()


def test_an_allowed_aaaa_answer_opens_exactly_that_ipv6_address(wiring: Wiring, spawn_resolving: Spawn) -> None:
    child = spawn_resolving()
    assert child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT)["error"] == "EPERM"  # not yet resolved

    lookup = child.do("dns", host=NO_SERVER_V6, port=DNS_PORT, name="v6.allowed.test", qtype="AAAA")

    assert lookup["ok"] and lookup["id_matches"]
    assert (lookup["rcode"], lookup["addresses"]) == (0, [ALLOWED_V6])
    assert lookup["from"] == [NO_SERVER_V6, DNS_PORT]  # the redirect stays invisible to the client
    assert wiring.upstream.questions == [("v6.allowed.test", "AAAA")]
    assert wiring.gate.entries() == [f"{ALLOWED_V6}/128"]
    assert wiring.table.snapshot() == {ALLOWED_V6: wiring.clock.now + 300}
    connected = child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT)
    assert connected["ok"] and connected["reply"] == f"{ALLOWED_V6}|ping"
    assert wiring.gate.counters()["redirected"] == 1


def test_addresses_never_answered_stay_refused_in_every_spelling(wiring: Wiring, spawn_resolving: Spawn) -> None:
    child = spawn_resolving()
    assert child.do("dns", host=NO_SERVER_V4, port=DNS_PORT, name="v6.allowed.test", qtype="AAAA")["addresses"] == [ALLOWED_V6]
    assert child.do("dns", host=NO_SERVER_V4, port=DNS_PORT, name="v4.allowed.test")["addresses"] == [ALLOWED_V4]

    assert child.do("tcp", host=DENIED_V6, port=SERVICE_PORT)["error"] == "EPERM"  # 2001:db8:77::3: a neighbour of 2001:db8:77::2
    assert child.do("tcp", host=f"::ffff:{DENIED_V4}", port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_sendto", host=f"::ffff:{DENIED_V4}", port=SERVICE_PORT)["error"] == "EPERM"
    # the learned IPv4 address is reachable from an IPv6 socket too: one entry serves both spellings
    assert child.do("tcp", host=f"::ffff:{ALLOWED_V4}", port=SERVICE_PORT)["reply"] == f"{ALLOWED_V4}|ping"
    assert wiring.gate.entries() == [f"{ALLOWED_V4}/32", f"{ALLOWED_V6}/128"]
    assert wiring.gate.counters()["denied"] == 3


def test_expiry_revokes_the_kernel_entry_unless_a_connection_to_it_is_open(wiring: Wiring, spawn_resolving: Spawn) -> None:
    child = spawn_resolving()
    for name in ("v4.allowed.test", "cidr.allowed.test"):
        assert child.do("dns", host=NO_SERVER_V4, port=DNS_PORT, name=name)["rcode"] == 0
    assert wiring.table.snapshot() == {ALLOWED_V4: wiring.clock.now + SHORT_TTL, IN_CIDR_V4: wiring.clock.now + SHORT_TTL}
    assert child.do("tcp", host=IN_CIDR_V4, port=SERVICE_PORT)["ok"]  # opened and closed again
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, keep="open")["ok"]
    assert wiring.table.expire() == []  # nothing is due yet

    wiring.clock.advance(SHORT_TTL)
    assert wiring.table.expire() == [IN_CIDR_V4]

    assert wiring.gate.entries() == [f"{ALLOWED_V4}/32"]
    assert child.do("tcp", host=IN_CIDR_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("send", name="open", payload="still-open")["reply"] == f"{ALLOWED_V4}|still-open"
    assert wiring.table.expire() == []  # due, but still in use: kept on every pass
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["ok"]

    child.stop()  # its open connection closes with it
    assert wiring.table.expire() == [ALLOWED_V4]
    assert wiring.gate.entries() == []
    assert spawn_resolving().do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"


def test_a_denied_name_gets_nxdomain_without_reaching_upstream(wiring: Wiring, spawn_resolving: Spawn) -> None:
    child = spawn_resolving()

    for server, qtype in ((NO_SERVER_V4, "A"), (NO_SERVER_V6, "AAAA")):
        lookup = child.do("dns", host=server, port=DNS_PORT, name="denied.elsewhere.test", qtype=qtype)
        assert lookup["ok"] and lookup["id_matches"]
        assert (lookup["rcode"], lookup["addresses"]) == (NXDOMAIN, [])

    assert wiring.upstream.questions == []
    assert wiring.gate.entries() == []
    assert wiring.resolver.stats()["denied"] == 2
    assert child.do("tcp", host=DENIED_V6, port=SERVICE_PORT)["error"] == "EPERM"


def test_a_narrowed_policy_refuses_new_lookups_and_connections_but_keeps_open_ones(
    wiring: Wiring, spawn_resolving: Spawn
) -> None:
    child = spawn_resolving()
    assert child.do("dns", host=NO_SERVER_V6, port=DNS_PORT, name="v6.allowed.test", qtype="AAAA")["rcode"] == 0
    assert child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT, keep="open")["ok"]

    narrower = NamePolicy.from_lists(["other.test"], [])
    revoked = wiring.table.clear_dynamic(lambda epoch: wiring.resolver.set_policy(narrower, epoch))  # as Gatekeeper.reload
    assert revoked == [ALLOWED_V6]

    again = child.do("dns", host=NO_SERVER_V6, port=DNS_PORT, name="v6.allowed.test", qtype="AAAA")
    assert (again["rcode"], again["addresses"]) == (NXDOMAIN, [])
    assert wiring.upstream.questions == [("v6.allowed.test", "AAAA")]  # only the lookup from before the swap
    assert wiring.gate.entries() == []
    assert child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT)["error"] == "EPERM"
    for round_trip in range(3):
        assert child.do("send", name="open", payload=f"after-{round_trip}")["reply"] == f"{ALLOWED_V6}|after-{round_trip}"
