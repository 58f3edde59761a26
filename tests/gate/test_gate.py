"""The egress gate in a real kernel: what a gated process can reach, what it is told, and what the daemon sees.

Each test attaches freshly compiled programs to its own cgroup and runs child processes inside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from ebpf.kernel_ids import cgroup_id
from tests.conftest import REPO_ROOT
from tests.gate.conftest import (
    ALLOWED_V4,
    ALLOWED_V6,
    DENIED_V4,
    DENIED_V6,
    DNS_PORT,
    IN_CIDR_V4,
    NO_SERVER_V4,
    NO_SERVER_V6,
    OUT_OF_CIDR_V4,
    SERVICE_PORT,
    GateCgroup,
    MakeGate,
    Resolver,
    Spawn,
    wait_for_event,
    wait_for_events,
)

pytestmark = pytest.mark.root


def test_allowed_address_connects_and_other_is_refused_at_once_with_an_event(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate()
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)
    child = spawn()

    allowed = child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)
    denied = child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)

    assert allowed["ok"] and allowed["reply"] == f"{ALLOWED_V4}|ping"
    assert denied["error"] == "EPERM"
    assert denied["elapsed"] < 0.5  # refused in connect(), no SYN and no timeout
    event = wait_for_event(gate, lambda e: e.verdict == "deny")
    assert (event.address, event.port, event.proto, event.family) == (DENIED_V4, SERVICE_PORT, "tcp", 4)
    assert (event.comm, event.pid, event.uid) == ("kmgate-client", child.host_pid, 0)
    assert gate.counters()["allowed"] == 1
    assert gate.counters()["denied"] == 1


def test_a_cidr_entry_allows_the_addresses_inside_it_only(make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn) -> None:
    gate = make_gate()
    gate.allow("198.18.77.32/28")
    gate.attach(gate_cgroup.path)
    child = spawn()

    assert child.do("tcp", host=IN_CIDR_V4, port=SERVICE_PORT)["reply"] == f"{IN_CIDR_V4}|ping"
    assert child.do("tcp", host=OUT_OF_CIDR_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert gate.entries() == ["198.18.77.32/28"]


def test_udp_sendto_is_gated_like_connect(make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn) -> None:
    gate = make_gate()
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)
    child = spawn()

    denied = child.do("udp_sendto", host=DENIED_V4, port=SERVICE_PORT)
    allowed = child.do("udp_sendto", host=ALLOWED_V4, port=SERVICE_PORT)

    assert denied["error"] == "EPERM"
    assert allowed["ok"] and allowed["reply"] == f"{ALLOWED_V4}|query"
    assert allowed["from"] == [ALLOWED_V4, SERVICE_PORT]
    event = wait_for_event(gate, lambda e: e.verdict == "deny")
    assert (event.address, event.port, event.proto) == (DENIED_V4, SERVICE_PORT, "udp")


def test_dns_to_any_address_reaches_the_resolver_and_the_reply_names_the_original_server(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn, resolver: Resolver
) -> None:
    gate = make_gate()  # nothing allowed: DNS needs no allowlist entry
    gate.attach(gate_cgroup.path)
    child = spawn()

    unconnected = child.do("udp_sendto", host=NO_SERVER_V4, port=DNS_PORT)
    connected = child.do("udp_connect", host=NO_SERVER_V4, port=DNS_PORT)
    over_tcp = child.do("tcp", host=NO_SERVER_V4, port=DNS_PORT, payload="tcp-query")
    over_v6 = child.do("udp_sendto", host=NO_SERVER_V6, port=DNS_PORT)
    # an AF_INET6 socket to a v4-mapped server: sent through the IPv4 hook, answered through the IPv6 one
    over_mapped = child.do("udp_sendto", host=f"::ffff:{NO_SERVER_V4}", port=DNS_PORT)

    assert unconnected["reply"] == "answer|query"
    assert unconnected["from"] == [NO_SERVER_V4, DNS_PORT]  # recvmsg4 restored the source
    assert connected["reply"] == "answer|query"
    assert connected["from"] == [NO_SERVER_V4, DNS_PORT]
    assert over_tcp["reply"] == "answer|tcp-query"
    assert over_tcp["peer"] == ["127.0.0.1", resolver.port]  # no getpeername hook: TCP shows where it landed
    assert over_v6["reply"] == "answer|query"
    assert over_v6["from"] == [NO_SERVER_V6, DNS_PORT]
    assert over_mapped["reply"] == "answer|query"
    assert over_mapped["from"] == [f"::ffff:{NO_SERVER_V4}", DNS_PORT]
    assert gate.counters()["redirected"] == 5
    assert gate.counters()["denied"] == 0


def test_ipv6_allowlist_and_v4_mapped_addresses_follow_the_ipv4_rules(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate()
    gate.allow(ALLOWED_V6)
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)
    child = spawn()

    assert child.do("tcp", host=ALLOWED_V6, port=SERVICE_PORT)["reply"] == f"{ALLOWED_V6}|ping"
    assert child.do("tcp", host=DENIED_V6, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("tcp", host=f"::ffff:{DENIED_V4}", port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("tcp", host=f"::ffff:{ALLOWED_V4}", port=SERVICE_PORT)["reply"] == f"{ALLOWED_V4}|ping"
    assert child.do("udp_sendto", host=DENIED_V6, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("udp_sendto", host=f"::ffff:{DENIED_V4}", port=SERVICE_PORT)["error"] == "EPERM"  # via the IPv4 hook
    assert child.do("udp_sendto", host=f"::ffff:{ALLOWED_V4}", port=SERVICE_PORT)["reply"] == f"{ALLOWED_V4}|query"
    denied = wait_for_events(gate, lambda e: e.verdict == "deny", count=4)
    assert [(e.family, e.address, e.proto) for e in denied] == [
        (6, DENIED_V6, "tcp"),
        (6, DENIED_V4, "tcp"),
        (6, DENIED_V6, "udp"),
        (4, DENIED_V4, "udp"),
    ]
    assert gate.entries() == [f"{ALLOWED_V4}/32", f"{ALLOWED_V6}/128"]


def test_log_mode_lets_a_denied_address_through_and_reports_it(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate(mode="log")
    gate.attach(gate_cgroup.path)
    child = spawn()

    assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["reply"] == f"{DENIED_V4}|ping"
    event = wait_for_event(gate, lambda e: e.verdict == "would-deny")
    assert (event.address, event.port, event.pid) == (DENIED_V4, SERVICE_PORT, child.host_pid)
    assert gate.counters()["would_deny"] == 1
    assert gate.counters()["denied"] == 0

    gate.set_mode("enforce")  # switching back takes effect on the next connect
    assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["error"] == "EPERM"


def test_audit_allows_reports_allowed_connections_and_redirects(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate()
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)
    child = spawn()
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["ok"]
    assert gate.poll_events(200) == []  # allows are silent unless audited

    gate.set_audit_allows(True)
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["ok"]
    assert child.do("udp_sendto", host=NO_SERVER_V4, port=DNS_PORT)["ok"]
    allowed, redirected = wait_for_events(gate, lambda e: e.verdict in ("allow", "redirect"), count=2)
    assert (allowed.verdict, redirected.verdict) == ("allow", "redirect")
    assert (allowed.address, allowed.port) == (ALLOWED_V4, SERVICE_PORT)
    assert (redirected.address, redirected.port, redirected.proto) == (NO_SERVER_V4, DNS_PORT, "udp")


def test_exempt_cgroups_and_their_descendants_are_not_gated_or_redirected(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    exempt = gate_cgroup.sub("system.slice")
    nested = gate_cgroup.sub("system.slice", "daemon.service")
    gate = make_gate()
    gate.set_exempt([cgroup_id(exempt)])
    gate.attach(gate_cgroup.path)

    for cgroup in (exempt, nested):
        child = spawn(cgroup)
        assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["reply"] == f"{DENIED_V4}|ping"
        dns = child.do("udp_sendto", host=ALLOWED_V4, port=DNS_PORT)
        assert dns["reply"] == f"{ALLOWED_V4}|query"  # the real server answered, not the resolver
    gated = spawn()
    assert gated.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert gated.do("udp_sendto", host=ALLOWED_V4, port=DNS_PORT)["reply"] == "answer|query"
    counters = {"allowed": 0, "denied": 1, "would_deny": 0, "redirected": 1, "events_dropped": 0, "proxied": 0}
    assert gate.counters() == {**counters, "sockets_denied": 0, "binds_denied": 0}


def test_revoke_refuses_new_connections_and_keeps_established_ones(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    gate = make_gate()
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)
    child = spawn()
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT, keep="long")["ok"]

    gate.revoke(ALLOWED_V4)

    assert gate.entries() == []
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert child.do("send", name="long", payload="still-there")["reply"] == f"{ALLOWED_V4}|still-there"


ATTACH_AND_EXIT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ebpf.gate import EgressGate
    gate = EgressGate(resolver_v4=("127.0.0.1", 9), resolver_v6=("::1", 9), mode="enforce")
    gate.attach(Path(sys.argv[1]))
    """
)


GATE_PROGRAMS = 12  # connect, sendmsg, recvmsg, getpeername and bind for each family, sock_create, sock_ops


def attached_programs(cgroup: GateCgroup) -> Counter[str]:
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup.path)], capture_output=True, text=True, check=True)
    return Counter(entry["attach_type"] for entry in json.loads(shown.stdout.strip() or "[]"))


def test_programs_stay_attached_after_the_loader_exits_and_a_new_loader_replaces_them(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn
) -> None:
    subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, str(gate_cgroup.path)], cwd=REPO_ROOT, check=True, timeout=60)

    assert sum(attached_programs(gate_cgroup).values()) == GATE_PROGRAMS
    child = spawn()
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["error"] == "EPERM"  # fail closed

    gate = make_gate()
    gate.allow(ALLOWED_V4)
    gate.attach(gate_cgroup.path)

    programs = attached_programs(gate_cgroup)
    assert set(programs.values()) == {1}, programs  # replaced, not stacked
    assert len(programs) == GATE_PROGRAMS
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["ok"]

    gate.detach(gate_cgroup.path)
    assert attached_programs(gate_cgroup) == Counter()
    assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["ok"]


def test_event_pids_are_those_of_the_sandbox_pid_namespace(make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn) -> None:
    in_namespace = spawn(prefix=("unshare", "--pid", "--fork", "--kill-child"))
    on_host = spawn()
    assert in_namespace.pid == 1
    gate = make_gate(pidns=in_namespace.pidns)
    gate.attach(gate_cgroup.path)

    assert in_namespace.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert wait_for_event(gate, lambda e: e.verdict == "deny").pid == 1
    assert on_host.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["error"] == "EPERM"
    assert wait_for_event(gate, lambda e: e.verdict == "deny").pid == on_host.host_pid  # outside it: host pid


def test_loopback_is_always_reachable(make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn, resolver: Resolver) -> None:
    gate = make_gate()
    gate.attach(gate_cgroup.path)
    child = spawn()
    started = time.monotonic()
    assert child.do("udp_sendto", host="127.0.0.1", port=resolver.port)["reply"] == "answer|query"
    assert child.do("udp_sendto", host="::1", port=resolver.port)["reply"] == "answer|query"
    assert time.monotonic() - started < 2
    assert gate.counters()["denied"] == 0


@pytest.mark.parametrize("mode", ["enforce", "log"])
def test_instance_metadata_is_refused_even_when_allowlisted_or_in_log_mode(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn, mode: str
) -> None:
    """The kernel refuses before any packet is built, so nothing is sent to these addresses."""
    gate = make_gate(mode=mode)
    for network in ("169.254.169.254", "fd00:ec2::254", "169.254.0.0/16"):
        gate.allow(network, static=True)
    gate.attach(gate_cgroup.path)
    child = spawn()

    assert child.do("tcp", host="169.254.169.254", port=80)["error"] == "EPERM"
    assert child.do("udp_sendto", host="169.254.169.254", port=80)["error"] == "EPERM"
    assert child.do("tcp", host="::ffff:169.254.169.254", port=80)["error"] == "EPERM"
    assert child.do("tcp", host="fd00:ec2::254", port=80)["error"] == "EPERM"
    assert gate.counters()["denied"] == 4


def test_a_new_loader_adopts_the_pinned_maps_with_what_was_learned(
    make_gate: MakeGate, gate_cgroup: GateCgroup, spawn: Spawn, bpffs: Path
) -> None:
    first = make_gate(pin_dir=bpffs)
    assert not first.adopted
    first.allow(ALLOWED_V4)
    first.allow("198.18.77.32/28", static=True)
    first.attach(gate_cgroup.path)
    first.close()  # the daemon exiting: programs stay attached, maps stay pinned

    second = make_gate(pin_dir=bpffs)
    second.attach(gate_cgroup.path)
    child = spawn()

    assert second.adopted
    assert second.entries_by_kind() == {f"{ALLOWED_V4}/32": False, "198.18.77.32/28": True}
    assert child.do("tcp", host=ALLOWED_V4, port=SERVICE_PORT)["ok"]  # learned before the restart
    assert child.do("tcp", host=IN_CIDR_V4, port=SERVICE_PORT)["ok"]
    assert child.do("tcp", host=DENIED_V4, port=SERVICE_PORT)["error"] == "EPERM"


def test_pinned_maps_of_another_layout_are_replaced_by_empty_ones(make_gate: MakeGate, bpffs: Path) -> None:
    subprocess.run(
        [
            "bpftool",
            "map",
            "create",
            str(bpffs / "allow4"),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "allow4",
        ],
        check=True,
    )

    gate = make_gate(pin_dir=bpffs)

    assert not gate.adopted and gate.discarded is not None and "allow4" in gate.discarded
    assert gate.entries() == []
    gate.allow(ALLOWED_V4)
    assert make_gate(pin_dir=bpffs).entries() == [f"{ALLOWED_V4}/32"]  # the new maps are the pinned ones now


def test_a_pinned_map_of_another_layout_is_dropped_alone_and_what_was_learned_is_kept(make_gate: MakeGate, bpffs: Path) -> None:
    """A daemon adding a counter slot must not forget the sandbox's allow maps: only `counters` starts empty."""
    first = make_gate(pin_dir=bpffs)
    first.allow(ALLOWED_V4)
    first.close()
    (bpffs / "counters").unlink()
    old_counters = ["type", "percpu_array", "key", "4", "value", "8", "entries", "6", "name", "counters"]
    subprocess.run(["bpftool", "map", "create", str(bpffs / "counters"), *old_counters], check=True)

    second = make_gate(pin_dir=bpffs)

    assert second.adopted and second.discarded is not None and "counters" in second.discarded
    assert second.entries() == [f"{ALLOWED_V4}/32"]
    assert set(second.counters().values()) == {0}
