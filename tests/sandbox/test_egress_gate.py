"""The egress gate in a real local sandbox, in front of a fake internet (tests/sandbox/world.py).

The sandbox's resolver forwards to the world's DNS server (`KM_LOCAL_DNS_UPSTREAM`); the agent's side
is played by `net_probe.py`, run as the sandbox user in the agent slice through `km shell`, exactly
where agent runs live. Every test here reaches only the world's namespace, which the test created.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.images.store import Image
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, DNS, World

pytestmark = pytest.mark.root
ALIAS = "gated"
EPERM = "errno 1"
PROFILE = textwrap.dedent(f"""\
    apiVersion: klankermaker.ai/v1alpha1
    kind: SandboxProfile
    metadata: {{name: gated, prefix: gt}}
    spec:
      lifecycle: {{ttl: "2h", idleTimeout: "30m", teardownPolicy: destroy}}
      runtime: {{substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}}
      execution: {{shell: /bin/bash, workingDir: /workspace}}
      network:
        enforcement: ebpf
        egress:
          allowedDNSSuffixes: [.allowed.test]
          allowedCIDRs: [{ADDRESSES["cidr"]}/32]
    """)
PROBE = Path(__file__).with_name("net_probe.py")


def probe(*args: str, root: bool = False, alias: str = ALIAS) -> str:
    """net_probe's answer in the sandbox, as the sandbox user in the agent slice (or as root)."""
    extra = ["--root"] if root else []
    result = km("shell", alias, *extra, "--", "python3", "/usr/local/bin/net_probe", *args, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def gate_status() -> dict[str, Any]:
    return dict(json.loads(km("status", ALIAS, "--json").stdout)["host_agent"]["gate"])


def create_in_world(profile: Path, alias: str) -> str:
    """A sandbox whose resolver forwards to the world's DNS server, with net_probe installed."""
    os.environ["KM_LOCAL_DNS_UPSTREAM"] = f"{DNS}:53"
    try:
        sandbox_id = str(json.loads(km("create", str(profile), "--json").stdout)["sandbox"]["id"])
    finally:
        os.environ.pop("KM_LOCAL_DNS_UPSTREAM")
    installed = km("shell", alias, "--root", "--", "sh", "-c", "cat > /usr/local/bin/net_probe", stdin=PROBE.read_text())
    if installed.returncode != 0:
        km("destroy", sandbox_id, "--yes", check=False)
        raise AssertionError(f"installing net_probe in {alias}: {installed.stderr}")
    return sandbox_id


@pytest.fixture(scope="module")
def gated(world: World, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("gated") / "gated.yaml"
    profile.write_text(PROFILE)
    sandbox_id = create_in_world(profile, ALIAS)
    try:
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def test_an_allowed_name_resolves_and_connects(gated: str) -> None:
    assert probe("resolve", "api.allowed.test") == ADDRESSES["api"]
    assert probe("http", "api.allowed.test") == f"hello from {ADDRESSES['api']}"


def test_a_denied_name_is_nxdomain_without_asking_upstream_and_its_address_is_eperm(gated: str, world: World) -> None:
    assert probe("resolve", "evil.test").startswith("gaierror")
    assert "evil.test." not in world.queries()
    assert probe("connect", ADDRESSES["evil"], "80") == EPERM


def test_a_raw_ip_never_learned_from_dns_is_denied(gated: str) -> None:
    assert probe("connect", ADDRESSES["unlisted"], "80") == EPERM
    assert probe("udp", ADDRESSES["unlisted"], "7") == EPERM


def test_a_suffix_matches_on_label_boundaries_case_and_trailing_dot(gated: str) -> None:
    assert probe("resolve", "evilallowed.test").startswith("gaierror")
    assert probe("resolve", "API.Allowed.TEST.") == ADDRESSES["api"]


def test_allowed_cidrs_need_no_dns(gated: str) -> None:
    assert probe("http", ADDRESSES["cidr"]) == f"hello from {ADDRESSES['cidr']}"


def test_a_hard_coded_resolver_still_lands_in_ours(gated: str, world: World) -> None:
    before = world.queries().get("evil.test.", 0)
    # Asked of the world's DNS server directly: our resolver answers (NXDOMAIN), under the server's address.
    assert probe("dns", DNS, "evil.test") == f"rcode 3 from {DNS}:53"
    assert world.queries().get("evil.test.", 0) == before
    assert probe("dns", DNS, "allowed.test") == f"rcode 0 {ADDRESSES['allowed']} from {DNS}:53"


def test_dns_over_tcp_is_answered_by_our_resolver_too(gated: str) -> None:
    assert probe("dns", DNS, "evil.test", "tcp") == "rcode 3"
    assert probe("dns", DNS, "allowed.test", "tcp") == f"rcode 0 {ADDRESSES['allowed']}"
    assert probe("http", ADDRESSES["allowed"]) == f"hello from {ADDRESSES['allowed']}"


def test_a_cname_out_of_the_allowlist_allows_the_final_address_of_an_allowed_name(gated: str) -> None:
    assert probe("resolve", "cname.allowed.test") == ADDRESSES["target"]
    assert probe("http", "cname.allowed.test") == f"hello from {ADDRESSES['target']}"
    assert probe("resolve", "target.elsewhere.test").startswith("gaierror")  # the target itself is not allowed


def test_root_services_outside_the_agent_slice_are_not_gated(gated: str) -> None:
    assert probe("connect", ADDRESSES["unlisted"], "80", root=True) == "ok"


def test_the_sandbox_user_cannot_get_raw_sockets_detach_the_gate_or_leave_its_cgroup(gated: str) -> None:
    script = (
        "grep CapBnd /proc/self/status; "
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)' 2>&1 | tail -1; "
        "(echo $$ > /sys/fs/cgroup/unified/system.slice/cgroup.procs) 2>&1 || true"
    )
    result = km("shell", ALIAS, "--", "sh", "-c", script, check=False)
    bounding = int(result.stdout.split()[1], 16)
    for capability in (12, 13, 21, 39):  # NET_ADMIN, NET_RAW, SYS_ADMIN, BPF: not even through sudo
        assert not bounding & (1 << capability), capability
    assert "PermissionError" in result.stdout
    assert "Permission denied" in result.stdout or "Read-only" in result.stdout


def test_the_gate_reports_its_state_in_km_status(gated: str) -> None:
    probe("resolve", "api.allowed.test")
    probe("connect", ADDRESSES["unlisted"], "80")
    status = gate_status()
    assert status["mode"] == "enforce" and status["enforcement"] == "ebpf"
    assert status["allow_entries"] >= 2  # the CIDR and at least one learned address
    assert status["decisions"]["denied"] >= 1
    assert "egress gate: enforce (ebpf)" in km("status", ALIAS).stdout


def test_restarting_the_agent_slice_leaves_the_gate_in_place(gated: str) -> None:
    refused = km("shell", ALIAS, "--", "systemctl", "stop", "kmagent.slice", check=False)
    assert refused.returncode != 0  # the sandbox user cannot restart its own slice
    restarted = km("shell", ALIAS, "--root", "--", "sh", "-c", "systemctl stop kmagent.slice && systemctl start kmagent.slice")
    assert restarted.returncode == 0, restarted.stderr
    assert probe("connect", ADDRESSES["unlisted"], "80") == EPERM  # a fresh slice, still gated


def test_the_gate_stays_closed_while_the_daemon_is_down(gated: str) -> None:
    stopped = km("shell", ALIAS, "--root", "--", "systemctl", "kill", "--signal=KILL", "km-host-agent", check=False)
    assert stopped.returncode == 0, stopped.stderr
    try:
        assert probe("connect", ADDRESSES["unlisted"], "80") == EPERM
        assert probe("connect", ADDRESSES["evil"], "80") == EPERM
    finally:
        km("shell", ALIAS, "--root", "--", "systemctl", "restart", "km-host-agent", check=False)
    assert probe("http", "api.allowed.test") == f"hello from {ADDRESSES['api']}"


def test_a_restarted_daemon_takes_over_what_was_learned(gated: str) -> None:
    """The maps are pinned: an agent holding a cached address keeps reaching it across a daemon restart."""
    assert probe("resolve", "api.allowed.test") == ADDRESSES["api"]

    restarted = km("shell", ALIAS, "--root", "--", "systemctl", "restart", "km-host-agent", check=False)

    assert restarted.returncode == 0, restarted.stderr
    assert probe("connect", ADDRESSES["api"], "80") == "ok"  # no new lookup in between
    assert probe("connect", ADDRESSES["unlisted"], "80") == EPERM
    journal = km("shell", ALIAS, "--root", "--", "journalctl", "-u", "km-host-agent", "-o", "cat", "--no-pager").stdout
    assert "took over the gate's pinned maps" in journal


def test_a_narrowed_allowlist_applies_live(gated: str, tmp_path: Path) -> None:
    assert probe("resolve", "api.allowed.test") == ADDRESSES["api"]
    narrowed = tmp_path / "gated.yaml"
    narrowed.write_text(PROFILE.replace("allowedDNSSuffixes: [.allowed.test]", "allowedDNSSuffixes: [.other.test]"))
    try:
        updated = km("create", str(narrowed), "--alias", ALIAS)
        assert "update" in (updated.stdout + updated.stderr)
        assert probe("resolve", "api.allowed.test").startswith("gaierror")
        assert probe("connect", ADDRESSES["api"], "80") == EPERM
    finally:
        restored = tmp_path / "restored.yaml"
        restored.write_text(PROFILE)
        km("create", str(restored), "--alias", ALIAS, check=False)


def test_learn_mode_lets_everything_through_and_reports_what_would_be_denied(
    world: World, debian_image: Image, tmp_path: Path
) -> None:
    profile = tmp_path / "learner.yaml"
    learner_profile = PROFILE.replace("name: gated, prefix: gt", "name: learner, prefix: ln")
    assert "\n  execution:" in learner_profile
    profile.write_text(learner_profile.replace("\n  execution:", "\n  observability: {learnMode: true}\n  execution:"))
    sandbox_id = create_in_world(profile, "learner")
    try:

        def learner_probe(*args: str) -> str:
            return km("shell", "learner", "--", "python3", "/usr/local/bin/net_probe", *args).stdout.strip()

        assert learner_probe("resolve", "evil.test") == ADDRESSES["evil"]
        assert learner_probe("http", ADDRESSES["unlisted"]) == f"hello from {ADDRESSES['unlisted']}"
        report_text = ""
        for _ in range(50):
            shown = km("shell", "learner", "--root", "--", "cat", "/var/lib/km-host-agent/learn-report.json", check=False)
            report_text = shown.stdout
            if ADDRESSES["unlisted"] in report_text and "evil.test" in report_text:
                break
            time.sleep(0.2)
        entries = json.loads(report_text)["entries"]
        dns_entry = next(entry for entry in entries if entry["kind"] == "dns" and entry["name"] == "evil.test")
        assert dns_entry["allowed"] is False and ADDRESSES["evil"] in dns_entry["addresses"]
        connect_entry = next(
            entry for entry in entries if entry["kind"] == "connect" and entry["address"] == ADDRESSES["unlisted"]
        )
        assert connect_entry["verdict"] == "would-deny" and connect_entry["port"] == 80
        status = json.loads(km("status", "learner", "--json").stdout)["host_agent"]["gate"]
        assert status["mode"] == "log" and status["decisions"]["would_deny"] >= 1
    finally:
        km("destroy", sandbox_id, "--yes", check=False)
