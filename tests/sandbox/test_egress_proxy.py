"""`network.enforcement: both` in a real local sandbox: the kernel gate plus the daemon's L7 forwarder,
in front of the test world (HTTP on 80, HTTPS on 443 with a self-signed certificate for *.allowed.test).

The agent's side is `net_probe.py` in the agent slice, as in test_egress_gate.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.images.store import Image
from tests.sandbox.test_egress_gate import EPERM, PROFILE, create_in_world
from tests.sandbox.test_egress_gate import probe as gate_probe
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, World

pytestmark = pytest.mark.root
ALIAS = "proxied"
PROXY_PROFILE = PROFILE.replace("name: gated, prefix: gt", f"name: {ALIAS}, prefix: px").replace(
    "enforcement: ebpf", "enforcement: both"
)


def probe(*args: str) -> str:
    return gate_probe(*args, alias=ALIAS)


@pytest.fixture(scope="module")
def proxied(world: World, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile: Path = tmp_path_factory.mktemp(ALIAS) / f"{ALIAS}.yaml"
    profile.write_text(PROXY_PROFILE)
    sandbox_id = create_in_world(profile, ALIAS)
    try:
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def test_allowed_names_work_over_http_and_https_through_the_forwarder(proxied: str) -> None:
    assert probe("http", "api.allowed.test") == f"hello from {ADDRESSES['api']}"
    assert probe("https", "api.allowed.test") == f"200 hello from {ADDRESSES['api']}"


def test_a_host_header_outside_the_allowlist_is_refused_even_on_an_allowed_address(proxied: str) -> None:
    assert probe("resolve", "allowed.test") == ADDRESSES["allowed"]

    refused = probe("http-as", ADDRESSES["allowed"], "evil.test")

    assert refused.startswith("403 ") and "evil.test" in refused


def test_an_sni_outside_the_allowlist_is_cut_off(proxied: str) -> None:
    assert probe("resolve", "allowed.test") == ADDRESSES["allowed"]

    assert probe("https", "allowed.test", "evil.test") == "closed"


def test_addresses_no_allowed_name_resolved_to_are_still_eperm(proxied: str) -> None:
    assert probe("connect", ADDRESSES["unlisted"], "80") == EPERM


def test_allowed_cidrs_bypass_the_forwarder(proxied: str) -> None:
    assert probe("http-as", ADDRESSES["cidr"], "not-a-listed-name.example") == f"200 hello from {ADDRESSES['cidr']}"


def test_status_shows_the_enforcement_and_the_forwarders_decisions(proxied: str) -> None:
    probe("http", "allowed.test")

    gate = json.loads(km("status", ALIAS, "--json").stdout)["host_agent"]["gate"]

    assert gate["enforcement"] == "both"
    assert gate["decisions"]["proxied"] >= 1
    assert gate["proxy"]["allowed"] >= 1
