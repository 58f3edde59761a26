"""A local sandbox's network seen from inside and outside, with real machines in front of the test world.

IPv6 end to end: an AAAA-only allowed name connects over IPv6 from the agent's side, while a denied
IPv6 address and the `::ffff:` form of a denied IPv4 address get EPERM from the gate (root, which the
gate exempts, reaches both: the path is there, the gate is what refuses). No inbound: a server listening
in a sandbox is not reachable from the host, from the world's namespace or from a second sandbox, in
either family, and a sandbox opens nothing on the host; the sandboxes still reach the world.
Every address used belongs to the sandboxes, the world or links this test made.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.images.store import Image
from controller.sandboxes import state_store
from controller.substrates.local.network import SandboxNetwork, km_rules
from tests.sandbox.test_egress_gate import EPERM, PROFILE, create_in_world, probe
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, ADDRESSES6, HOST6, NETWORK, World

pytestmark = pytest.mark.root
PROBE = Path(__file__).with_name("net_probe.py")
LISTENER_PORT = 8080


@dataclass(frozen=True)
class Sandbox:
    alias: str
    sandbox_id: str
    network: SandboxNetwork


def listen_inside(alias: str) -> None:
    """A dual-stack HTTP server on 8080 in the sandbox, as a root service (a listener is not egress)."""
    started = km("shell", alias, "--root", "--", "systemd-run", "--unit=km-test-listener", "--",
                 "python3", "-m", "http.server", "--bind", "::", str(LISTENER_PORT), check=False)  # fmt: skip
    assert started.returncode == 0, started.stderr
    for _ in range(50):
        if probe("connect", "127.0.0.1", str(LISTENER_PORT), root=True, alias=alias) == "ok":
            return
    raise AssertionError(f"the listener in {alias} did not come up")


@pytest.fixture(scope="module")
def sandboxes(world: World, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    try:
        for name, prefix in (("netone", "na"), ("nettwo", "nb")):
            profile = tmp_path_factory.mktemp(name) / f"{name}.yaml"
            profile.write_text(PROFILE.replace("name: gated, prefix: gt", f"name: {name}, prefix: {prefix}"))
            sandbox_id = create_in_world(profile, name)
            record = state_store().get(sandbox_id)
            made.append(Sandbox(name, sandbox_id, SandboxNetwork(sandbox_id, int(record.resources["slot"]))))
            listen_inside(name)
        yield made
    finally:
        for sandbox in made:
            km("destroy", sandbox.sandbox_id, "--yes", check=False)


def test_ipv6_is_on_inside_with_a_default_route(sandboxes: list[Sandbox]) -> None:
    one = sandboxes[0]
    shown = km("shell", one.alias, "--", "sh", "-c", "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 route show default")
    assert shown.stdout.splitlines()[0] == "0"
    assert f"default via {one.network.host_address6}" in shown.stdout


def test_an_aaaa_only_allowed_name_connects_over_ipv6(sandboxes: list[Sandbox]) -> None:
    alias = sandboxes[0].alias
    assert probe("resolve", "v6only.allowed.test", alias=alias) == ADDRESSES6["v6only"]
    assert probe("http", "v6only.allowed.test", alias=alias) == f"hello from {ADDRESSES6['v6only']}"


def test_a_denied_aaaa_only_name_does_not_resolve(sandboxes: list[Sandbox]) -> None:
    assert probe("resolve", "v6only.evil.test", alias=sandboxes[0].alias).startswith("gaierror")


@pytest.mark.parametrize(
    "address", [ADDRESSES6["evil"], ADDRESSES6["unlisted"], f"::ffff:{ADDRESSES['evil']}", f"::ffff:{ADDRESSES['unlisted']}"]
)
def test_denied_ipv6_and_mapped_addresses_are_refused_by_the_gate(sandboxes: list[Sandbox], address: str) -> None:
    alias = sandboxes[0].alias
    assert probe("connect", address, "80", alias=alias) == EPERM
    assert probe("connect", address, "80", root=True, alias=alias) == "ok"  # the path exists; the gate refuses


def outside(namespace: str | None, address: str, port: int = LISTENER_PORT) -> str:
    """net_probe's `connect` from the host (namespace None) or from a namespace this test made."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    argv = [*prefix, sys.executable, str(PROBE), "connect", address, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()


def test_a_server_in_a_sandbox_is_reachable_from_inside_only(sandboxes: list[Sandbox], world: World) -> None:
    one, two = sandboxes
    for address in (one.network.sandbox_address, one.network.sandbox_address6):
        assert probe("connect", address, str(LISTENER_PORT), root=True, alias=one.alias) == "ok"  # it listens
        assert outside(None, address) != "ok"  # from the host
        assert outside(world.namespace, address) != "ok"  # from the world's namespace
        assert probe("connect", address, str(LISTENER_PORT), root=True, alias=two.alias) != "ok"  # from a neighbour
    for address in (two.network.sandbox_address, two.network.sandbox_address6):  # and the other way round
        assert probe("connect", address, str(LISTENER_PORT), root=True, alias=one.alias) != "ok"


def test_a_sandbox_opens_nothing_on_the_host(sandboxes: list[Sandbox]) -> None:
    one = sandboxes[0]
    addresses = (one.network.host_address, one.network.host_address6, f"{NETWORK}.1", HOST6)  # its gateway, the world link
    listeners = []
    try:
        for address in addresses:
            listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((address, 0))
            listener.listen()
            listeners.append(listener)
        for listener in listeners:
            address, port = listener.getsockname()[:2]
            assert outside(None, address, port) == "ok"  # the host itself reaches its listener
            assert probe("connect", address, str(port), root=True, alias=one.alias) != "ok"
    finally:
        for listener in listeners:
            listener.close()


def test_the_sandboxes_still_reach_the_world_in_both_families(sandboxes: list[Sandbox]) -> None:
    for sandbox in sandboxes:
        assert probe("http", "allowed.test", alias=sandbox.alias) == f"hello from {ADDRESSES['allowed']}"
        assert probe("http", "v6only.allowed.test", alias=sandbox.alias) == f"hello from {ADDRESSES6['v6only']}"


@contextmanager
def another_state_directory(root: Path) -> Iterator[None]:
    """km as a second installation would run it (the README's goose beside the test suite): its own state."""
    saved = {key: os.environ[key] for key in ("KM_STATE_DIR", "KM_SANDBOX_DIR")}
    os.environ.update(KM_STATE_DIR=str(root / "state"), KM_SANDBOX_DIR=str(root / "sandboxes"))
    try:
        yield
    finally:
        os.environ.update(saved)


def test_a_second_state_directory_gets_other_blocks_and_its_sandbox_resolves(sandboxes: list[Sandbox], tmp_path: Path) -> None:
    """The user's report: both stores number their first sandbox 1; the second must not reuse the first's /30."""
    profile = tmp_path / "netthree.yaml"
    profile.write_text(PROFILE.replace("name: gated, prefix: gt", "name: netthree, prefix: nc"))
    with another_state_directory(tmp_path):
        sandbox_id = create_in_world(profile, "netthree")
        try:
            record = state_store().get(sandbox_id)
            taken = {sandbox.network.slot for sandbox in sandboxes}
            assert int(record.resources["slot"]) not in taken
            assert probe("resolve", "api.allowed.test", alias="netthree") == ADDRESSES["api"]
            assert probe("http", "v6only.allowed.test", alias="netthree") == f"hello from {ADDRESSES6['v6only']}"
        finally:
            km("destroy", sandbox_id, "--yes", check=False)
    assert probe("http", "allowed.test", alias=sandboxes[0].alias) == f"hello from {ADDRESSES['allowed']}"


def test_destroy_removes_exactly_its_own_host_rules(sandboxes: list[Sandbox]) -> None:
    one, two = sandboxes
    before_one = [rule for rule in km_rules() if rule.sandbox_id == one.sandbox_id]
    assert {rule.chain for rule in before_one} == {"postrouting", "forward", "input", "output"}
    km("destroy", two.sandbox_id, "--yes")
    assert not [rule for rule in km_rules() if rule.sandbox_id == two.sandbox_id]
    assert [rule for rule in km_rules() if rule.sandbox_id == one.sandbox_id] == before_one
    assert probe("http", "v6only.allowed.test", alias=one.alias) == f"hello from {ADDRESSES6['v6only']}"
