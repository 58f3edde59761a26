"""The daemon's Gatekeeper as the daemon runs it (gate, resolver, allow table, reload, restart, status, learn
report) on a real cgroup, in a network namespace of its own (tests/gate/gatekeeper_host.py).

What is checked here is the wiring: leaving learn mode revokes what it learned, live and across a restart;
an allowed name's answer in a private range stays closed and status and the learn report say why; the
daemon's ports cannot be bound by the agent while the daemon is down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.gate.conftest import GateCgroup, cgroup2_mount
from tests.gate.gatekeeper_host import OTHER_V4, PRIVATE_V4, PUBLIC_V4, SERVICE_PORT
from tests.gate.resolver_wiring import ResolvingChild

pytestmark = pytest.mark.root

NXDOMAIN = 3
ALLOWED = {"allowed_dns_suffixes": ["allowed.test"]}
RESOLVER_PORT, PROXY_PORT, TELEMETRY_PORT = 10053, 10080, 4318


class Host:
    """One run of the daemon's gatekeeper (a process in its own network namespace) and its gated children."""

    def __init__(self, cgroup: Path, state: Path, pin_dir: Path | None, egress: dict[str, Any], join: int | None = None) -> None:
        """`join`: a pid whose network namespace to run in (a restart); otherwise a fresh one."""
        self.cgroup = cgroup
        namespace = ["nsenter", f"--net=/proc/{join}/ns/net"] if join else ["unshare", "--net"]
        self.process = subprocess.Popen(
            [*namespace, sys.executable, "-m", "tests.gate.gatekeeper_host"]
            + [str(cgroup), str(state), str(pin_dir or "-"), json.dumps(egress)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children: list[ResolvingChild] = []
        self.namespace = f"/proc/{self.process.pid}/ns/net"
        hello = self._read()
        assert hello["ready"], hello
        self.adopted: bool = hello["adopted"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the gatekeeper host exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def do(self, op: str, **arguments: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self._read().get("answer")

    def child(self, cgroup: Path | None = None) -> ResolvingChild:
        """A process in this namespace and in `cgroup` (the gated one unless told otherwise)."""
        child = ResolvingChild(cgroup or self.cgroup, prefix=("nsenter", f"--net={self.namespace}"))
        self.children.append(child)
        return child

    def stop(self) -> None:
        """The daemon stopping: the programs stay attached, the gated children stay where they are."""
        self.do("stop")
        self.process.wait(10)

    def kill(self) -> None:
        for child in self.children:
            child.stop()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


StartHost = Callable[..., Host]


@pytest.fixture
def start_host(gate_cgroup: GateCgroup, tmp_path: Path) -> Iterator[StartHost]:
    hosts: list[Host] = []

    def start(egress: dict[str, Any], pin_dir: Path | None = None, join: int | None = None) -> Host:
        host = Host(gate_cgroup.path, tmp_path, pin_dir, egress, join)
        hosts.append(host)
        return host

    try:
        yield start
    finally:
        for host in reversed(hosts):
            host.kill()


def resolve(child: ResolvingChild, name: str) -> dict[str, Any]:
    return child.do("dns", host="192.0.2.53", port=53, name=name)  # any server: the gate sends it to the resolver


def connects(child: ResolvingChild, address: str) -> bool | str:
    """True when the lab's service answered; otherwise the error (EPERM: the gate)."""
    result = child.do("tcp", host=address, port=SERVICE_PORT)
    return result.get("reply") == f"{address}|ping" or result["error"]


def eventually(probe: Callable[[], Any], timeout: float = 5) -> Any:
    """Gate events reach the daemon through a ring buffer it polls: wait for their effect to show."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)
    return value


def test_leaving_learn_mode_live_revokes_everything_it_learned(start_host: StartHost) -> None:
    host = start_host({**ALLOWED, "mode": "log"})
    child = host.child()
    assert resolve(child, "other.test")["addresses"] == [OTHER_V4]  # learn mode answers every name
    assert resolve(child, "site.allowed.test")["addresses"] == [PUBLIC_V4]

    host.do("reload", egress={**ALLOWED, "mode": "enforce"})

    assert connects(child, OTHER_V4) == "EPERM"
    assert connects(child, PUBLIC_V4) == "EPERM"  # learned under learn mode's answer-everything policy
    assert resolve(child, "other.test")["rcode"] == NXDOMAIN
    assert resolve(child, "site.allowed.test")["addresses"] == [PUBLIC_V4]
    assert connects(child, PUBLIC_V4) is True


def test_leaving_learn_mode_across_a_restart_revokes_everything_it_learned(start_host: StartHost, bpffs: Path) -> None:
    learning = start_host({**ALLOWED, "mode": "log"}, pin_dir=bpffs)
    child = learning.child()
    resolve(child, "other.test")
    resolve(child, "site.allowed.test")
    learning.stop()

    enforcing = start_host({**ALLOWED, "mode": "enforce"}, pin_dir=bpffs, join=child.host_pid)

    assert enforcing.adopted  # the maps were taken over, and what they held was revoked
    assert enforcing.do("status")["allow_entries"] == 0
    assert connects(child, OTHER_V4) == "EPERM"
    assert connects(child, PUBLIC_V4) == "EPERM"
    assert resolve(child, "site.allowed.test")["addresses"] == [PUBLIC_V4]
    assert connects(child, PUBLIC_V4) is True


def test_a_restart_in_the_same_mode_keeps_what_was_learned(start_host: StartHost, bpffs: Path) -> None:
    """The control for the test above: the revocation comes from the mode, not from restarting."""
    first = start_host({**ALLOWED, "mode": "enforce"}, pin_dir=bpffs)
    child = first.child()
    resolve(child, "site.allowed.test")
    first.stop()

    start_host({**ALLOWED, "mode": "enforce"}, pin_dir=bpffs, join=child.host_pid)

    assert connects(child, PUBLIC_V4) is True


def test_an_allowed_names_private_answer_stays_closed_and_status_says_why(start_host: StartHost) -> None:
    host = start_host({**ALLOWED, "mode": "enforce"})
    child = host.child()

    assert resolve(child, "lan.allowed.test")["addresses"] == [PRIVATE_V4]
    assert connects(child, PRIVATE_V4) == "EPERM"

    refused = eventually(lambda: [e for e in host.do("status")["refused_answers"] if e["denied_connects"] == 1])
    assert [(e["address"], e["name"]) for e in refused] == [(PRIVATE_V4, "lan.allowed.test")]
    assert "private" in refused[0]["reason"] and "allowedCIDRs" in refused[0]["reason"]

    host.do("reload", egress={**ALLOWED, "mode": "enforce", "allowed_cidrs": ["10.99.0.0/24"]})
    assert connects(child, PRIVATE_V4) is True  # the operator's explicit choice opens it


def test_in_learn_mode_the_report_says_why_a_private_answer_would_be_refused(start_host: StartHost, tmp_path: Path) -> None:
    host = start_host({**ALLOWED, "mode": "log"})
    child = host.child()

    resolve(child, "lan.allowed.test")
    assert connects(child, PRIVATE_V4) is True  # learn mode lets it through, and reports it

    def connect_entry() -> dict[str, Any] | None:
        host.do("tick")
        report = json.loads((tmp_path / "learn-report.json").read_text())
        found = [e for e in report["entries"] if e["kind"] == "connect" and e["address"] == PRIVATE_V4]
        return found[0] if found else None

    entry = eventually(connect_entry)
    assert entry["verdict"] == "would-deny" and entry["name"] == "lan.allowed.test" and "private" in entry["reason"]
    report = json.loads((tmp_path / "learn-report.json").read_text())
    dns_entry = next(e for e in report["entries"] if e["kind"] == "dns" and e["name"] == "lan.allowed.test")
    assert dns_entry["refused"] == {PRIVATE_V4: "private"}


def test_while_the_daemon_is_down_the_agent_cannot_take_its_ports(start_host: StartHost) -> None:
    host = start_host({**ALLOWED, "mode": "enforce"})
    gated = host.child()
    ungated = host.child(own_cgroup())  # outside the cgroup the gate is attached to
    host.stop()  # the resolver's and forwarder's sockets are closed; the programs stay attached

    for port in (RESOLVER_PORT, PROXY_PORT, TELEMETRY_PORT):
        for address in ("127.0.0.1", "::1", "0.0.0.0"):
            for kind in ("udp", "tcp"):
                assert gated.do("bind", host=address, port=port, kind=kind)["error"] == "EPERM", (address, port, kind)
                assert ungated.do("bind", host=address, port=port, kind=kind)["ok"], (address, port, kind)


def own_cgroup() -> Path:
    relative = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
    return cgroup2_mount() / relative.lstrip("/")
