"""Only TCP and UDP sockets, and none of the daemon's ports: the gate's sock_create and bind programs in a real kernel.

Socket creation is tried in a network namespace this module creates, with `net.ipv4.ping_group_range` opened
there, so an ICMP datagram socket's EPERM comes from the gate and not from the sysctl: the same socket() is
made first by a child in an ungated cgroup of that namespace. Protocols this kernel lacks (SCTP here) are
skipped, after that ungated attempt says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf.gate import GateError
from ebpf.kernel_ids import cgroup_id
from tests.gate.conftest import Child, GateCgroup, MakeGate, Spawn, bind_resolver_sockets, run, wait_for_event

pytestmark = pytest.mark.root

IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
IPPROTO_MPTCP = 262
# What socket() says when the kernel has no such protocol (or no module for it).
NOT_IN_THIS_KERNEL = {"EPROTONOSUPPORT", "ESOCKTNOSUPPORT", "EAFNOSUPPORT", "EPROTOTYPE"}

SOCKET_TYPES = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_RAW: "raw",
    socket.SOCK_SEQPACKET: "seqpacket",
}
ALLOWED = [
    pytest.param(socket.AF_INET, socket.SOCK_STREAM, 0, id="tcp4-default"),
    pytest.param(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, id="tcp6"),
    pytest.param(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, id="udp4"),
    pytest.param(socket.AF_INET6, socket.SOCK_DGRAM, 0, id="udp6-default"),
    # Families the hook never sees: they stay usable (seccomp on the agent's units decides about them).
    pytest.param(socket.AF_UNIX, socket.SOCK_STREAM, 0, id="unix-stream"),
    pytest.param(socket.AF_NETLINK, socket.SOCK_RAW, 0, id="netlink-route"),
]
# (family, type, protocol, whether the kernel may lack it, the protocol's name in the event)
REFUSED = [
    pytest.param(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, False, "icmp", id="raw4-icmp"),
    pytest.param(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP, False, "tcp", id="raw4-claiming-tcp"),
    pytest.param(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6, False, "icmpv6", id="raw6-icmpv6"),
    pytest.param(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP, False, "icmp", id="ping4"),
    pytest.param(socket.AF_INET6, socket.SOCK_DGRAM, IPPROTO_ICMPV6, False, "icmpv6", id="ping6"),
    pytest.param(socket.AF_INET, socket.SOCK_DGRAM, IPPROTO_UDPLITE, True, "udplite", id="udplite4"),
    pytest.param(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP, True, "mptcp", id="mptcp4"),
    pytest.param(socket.AF_INET6, socket.SOCK_STREAM, IPPROTO_MPTCP, True, "mptcp", id="mptcp6"),
    pytest.param(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_SCTP, True, "sctp", id="sctp4-stream"),
    pytest.param(socket.AF_INET6, socket.SOCK_SEQPACKET, IPPROTO_SCTP, True, "sctp", id="sctp6-seqpacket"),
]


@pytest.fixture(scope="module")
def ping_namespace() -> Iterator[str]:
    """A network namespace of this module's own where every group may open ICMP datagram sockets."""
    name = f"kmgate-sock-{os.getpid()}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "netns", "exec", name, "sh", "-c", 'echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range')
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def cgroups(gate_cgroup: GateCgroup) -> tuple[Path, Path, Path]:
    """(gated, exempt below gated, ungated sibling): the gate goes on the first."""
    return gate_cgroup.sub("gated"), gate_cgroup.sub("gated", "exempt"), gate_cgroup.sub("free")


def in_namespace(spawn: Spawn, cgroup: Path, namespace: str) -> Child:
    return spawn(cgroup, prefix=("nsenter", f"--net=/run/netns/{namespace}"))


@pytest.mark.parametrize(("family", "kind", "proto"), ALLOWED)
def test_tcp_udp_unix_and_netlink_sockets_are_created_as_before(
    family: int, kind: int, proto: int, make_gate: MakeGate, cgroups: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    gated_cgroup, _exempt, _free = cgroups
    gate = make_gate()
    gate.attach(gated_cgroup)

    assert spawn(gated_cgroup).do("socket", family=family, kind=kind, proto=proto)["ok"]
    assert gate.counters()["sockets_denied"] == 0


@pytest.mark.parametrize(("family", "kind", "proto", "optional", "proto_name"), REFUSED)
def test_other_inet_sockets_get_eperm_where_an_ungated_process_gets_them(
    family: int,
    kind: int,
    proto: int,
    optional: bool,
    proto_name: str,
    make_gate: MakeGate,
    cgroups: tuple[Path, Path, Path],
    spawn: Spawn,
    ping_namespace: str,
) -> None:
    gated_cgroup, _exempt, free_cgroup = cgroups
    gate = make_gate()
    gate.attach(gated_cgroup)
    request = {"family": family, "kind": kind, "proto": proto}

    ungated = in_namespace(spawn, free_cgroup, ping_namespace).do("socket", **request)
    if optional and ungated.get("error") in NOT_IN_THIS_KERNEL:
        pytest.skip(f"this kernel has no {proto_name} sockets of this kind: {ungated['error']} without the gate")
    assert ungated["ok"], ungated  # root, and ping_group_range open: only the gate can refuse it
    gated = in_namespace(spawn, gated_cgroup, ping_namespace)
    assert gated.do("socket", **request)["error"] == "EPERM"

    event = wait_for_event(gate, lambda e: e.hook == "socket")
    assert (event.verdict, event.proto, event.comm) == ("deny", proto_name, "kmgate-client")
    assert (event.family, event.socket_type) == (4 if family == socket.AF_INET else 6, SOCKET_TYPES[kind])
    assert (event.pid, event.port) == (gated.host_pid, 0)
    assert gate.counters()["sockets_denied"] == 1


def test_learn_mode_refuses_other_sockets_too(
    make_gate: MakeGate, cgroups: tuple[Path, Path, Path], spawn: Spawn, ping_namespace: str
) -> None:
    """Learn mode opens addresses, not protocols: an allowlist could never allow a raw socket anyway."""
    gated_cgroup, _exempt, _free = cgroups
    gate = make_gate(mode="log")
    gate.attach(gated_cgroup)
    child = in_namespace(spawn, gated_cgroup, ping_namespace)

    assert child.do("socket", family=socket.AF_INET, kind=socket.SOCK_DGRAM, proto=socket.IPPROTO_ICMP)["error"] == "EPERM"
    assert child.do("socket", family=socket.AF_INET, kind=socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)["error"] == "EPERM"
    assert gate.counters()["sockets_denied"] == 2


def test_exempt_cgroups_create_any_socket(
    make_gate: MakeGate, cgroups: tuple[Path, Path, Path], spawn: Spawn, ping_namespace: str
) -> None:
    gated_cgroup, exempt_cgroup, _free = cgroups
    gate = make_gate()
    gate.set_exempt([cgroup_id(exempt_cgroup)])
    gate.attach(gated_cgroup)
    child = in_namespace(spawn, exempt_cgroup, ping_namespace)

    for family, kind, proto in (
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
        (socket.AF_INET6, socket.SOCK_DGRAM, IPPROTO_ICMPV6),
    ):
        assert child.do("socket", family=family, kind=kind, proto=proto)["ok"]
    assert gate.counters()["sockets_denied"] == 0


# ---- binding the daemon's ports -------------------------------------------------------------------------


@pytest.fixture
def ports() -> tuple[int, int, int]:
    """Three ports free on loopback for TCP and UDP now: two for the daemon, one for anybody."""
    held = [bind_resolver_sockets() for _ in range(3)]
    for _port, sockets in held:
        for sock in sockets:
            sock.close()
    first, second, third = (port for port, _sockets in held)
    return first, second, third


BIND_ADDRESSES = ["127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"]


@pytest.mark.parametrize("mode", ["enforce", "log"])
def test_the_daemons_ports_cannot_be_bound_on_any_address_by_tcp_or_udp(
    mode: str, make_gate: MakeGate, cgroups: tuple[Path, Path, Path], spawn: Spawn, ports: tuple[int, int, int]
) -> None:
    resolver_port, proxy_port, other_port = ports
    gated_cgroup, _exempt, _free = cgroups
    gate = make_gate(mode=mode, daemon_ports=(resolver_port, proxy_port))
    gate.attach(gated_cgroup)
    child = spawn(gated_cgroup)

    refused = [
        (host, port, kind)
        for host in BIND_ADDRESSES
        for port in (resolver_port, proxy_port)
        for kind in ("tcp", "udp")
        if child.do("bind", host=host, port=port, kind=kind).get("error") == "EPERM"
    ]
    assert len(refused) == len(BIND_ADDRESSES) * 2 * 2
    for kind in ("tcp", "udp"):
        assert child.do("bind", host="0.0.0.0", port=other_port, kind=kind)["ok"]
        assert child.do("bind", host="::", port=other_port, kind=kind)["ok"]
        assert child.do("bind", host="127.0.0.1", port=0, kind=kind)["ok"]
    event = wait_for_event(gate, lambda e: e.hook == "bind")
    assert (event.verdict, event.address, event.port, event.proto) == ("deny", "127.0.0.1", resolver_port, "tcp")
    assert gate.counters()["binds_denied"] == len(refused)


def test_exempt_cgroups_bind_the_daemons_ports(
    make_gate: MakeGate, cgroups: tuple[Path, Path, Path], spawn: Spawn, ports: tuple[int, int, int]
) -> None:
    resolver_port, _proxy_port, _other = ports
    gated_cgroup, exempt_cgroup, _free = cgroups
    gate = make_gate(daemon_ports=(resolver_port,))
    gate.set_exempt([cgroup_id(exempt_cgroup)])
    gate.attach(gated_cgroup)

    exempt = spawn(exempt_cgroup)
    assert exempt.do("bind", host="127.0.0.1", port=resolver_port, kind="udp")["ok"]
    assert exempt.do("bind", host="::", port=resolver_port, kind="tcp")["ok"]
    assert gate.counters()["binds_denied"] == 0


@pytest.mark.parametrize("ports_given", [(0,), (1, 2, 3, 4, 5), (70000,)])
def test_daemon_ports_are_checked(make_gate: MakeGate, ports_given: tuple[int, ...]) -> None:
    with pytest.raises(GateError, match="daemon_ports"):
        make_gate(daemon_ports=ports_given)
