"""`spec.observability` in real local sandboxes in front of the test world: TLS capture by uprobes filtered
to each sandbox's agent slice (two sandboxes from one image side by side, sharing libssl's inode), DNS
and gate events, a fake Claude Code exporting its own OTLP to the host agent's receiver, and `km otel`
reading all of it back from the host's artifacts directory.

The agent's side is `net_probe.py` (python's ssl, so OpenSSL's libssl) in the agent slice.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.images.store import Image
from tests.conftest import REPO_ROOT
from tests.sandbox.test_egress_gate import EPERM, PROFILE, create_in_world
from tests.sandbox.test_egress_gate import probe as gate_probe
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, World

pytestmark = pytest.mark.root
OBSERVED, NEIGHBOUR = "observed", "neighbour"
OBSERVABILITY = """\
  observability:
    tlsCapture: {enabled: true, capturePayloads: true, maxPayloadBytes: 1024}
    claudeTelemetry: {enabled: true, logPrompts: true, logToolDetails: false}
"""
FAKE_CLAUDE = REPO_ROOT / "tests/fakes/claude_otel.py"


def profile_text(alias: str, prefix: str) -> str:
    return PROFILE.replace("name: gated, prefix: gt", f"name: {alias}, prefix: {prefix}") + OBSERVABILITY


def probe(alias: str, *args: str, root: bool = False) -> str:
    return gate_probe(*args, alias=alias, root=root)


def otel(alias: str, *flags: str) -> Any:
    result = km("otel", alias, *flags)
    return json.loads(result.stdout) if "--json" in flags else result.stdout


def marker() -> str:
    return f"/km-{secrets.token_hex(6)}"


@pytest.fixture(scope="module")
def sandboxes(world: World, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two sandboxes with capture on, made from the same image: their libssl is one inode."""
    directory = tmp_path_factory.mktemp("observed")
    created: dict[str, str] = {}
    try:
        for alias, prefix in ((OBSERVED, "ob"), (NEIGHBOUR, "nb")):
            profile = directory / f"{alias}.yaml"
            profile.write_text(profile_text(alias, prefix))
            created[alias] = create_in_world(profile, alias)
        yield created
    finally:
        for sandbox_id in created.values():
            km("destroy", sandbox_id, "--yes", check=False)


def events_of(alias: str, kind: str) -> list[dict[str, Any]]:
    return [event for event in otel(alias, "--json") if event["type"] == kind]


def test_agent_https_is_captured_with_its_host_request_and_plaintext(sandboxes: dict[str, str]) -> None:
    path = marker()

    assert probe(OBSERVED, "https-get", "api.allowed.test", path) == f"200 hello from {ADDRESSES['api']}"

    events = otel(OBSERVED, "--json")
    [dns] = [e for e in events if e["type"] == "dns" and e["host"] == "api.allowed.test" and e.get("qtype") == "A"][-1:]
    assert dns["decision"] == "allowed" and ADDRESSES["api"] in dns["addresses"]
    found = [e for e in events if e["type"] == "tls" and e.get("http.path") == path]
    assert found, json.loads(km("status", OBSERVED, "--json").stdout)["host_agent"]["capture"]
    [request] = found
    assert (request["host"], request["port"], request["direction"], request["http.method"]) == (
        "api.allowed.test",
        443,
        "write",
        "GET",
    )
    assert request["process"].startswith("python3") and request["payload"].startswith(f"GET {path} HTTP/1.0")
    replies = [e for e in events if e["type"] == "tls" and e["direction"] == "read" and e.get("http.status") == 200]
    assert replies and all(reply["host"] == "api.allowed.test" for reply in replies)


def test_a_neighbour_from_the_same_image_is_not_captured_here(sandboxes: dict[str, str]) -> None:
    ours, theirs = marker(), marker()

    probe(OBSERVED, "https-get", "api.allowed.test", ours)
    probe(NEIGHBOUR, "https-get", "api.allowed.test", theirs)

    observed = json.dumps(otel(OBSERVED, "--json"))
    neighbour = json.dumps(otel(NEIGHBOUR, "--json"))
    assert ours in observed and theirs not in observed
    assert theirs in neighbour and ours not in neighbour


def test_root_outside_the_agent_slice_is_not_captured(sandboxes: dict[str, str]) -> None:
    path = marker()

    # Root's services are not gated, nor do they use the sandbox's resolver: by address.
    assert probe(OBSERVED, "https-get", ADDRESSES["api"], path, root=True).startswith("200 ")

    assert path not in json.dumps(otel(OBSERVED, "--json"))


def test_a_refused_connection_is_a_gate_event(sandboxes: dict[str, str]) -> None:
    assert probe(OBSERVED, "connect", ADDRESSES["unlisted"], "80") == EPERM

    refused = [e for e in events_of(OBSERVED, "gate") if e["address"] == ADDRESSES["unlisted"]]
    assert refused and refused[-1]["decision"] == "denied" and refused[-1]["port"] == 80
    assert refused[-1]["host"] == ADDRESSES["unlisted"]  # no allowed name ever resolved to it


def test_claude_codes_own_telemetry_reaches_km_otel(sandboxes: dict[str, str]) -> None:
    install = "cat > /usr/local/bin/claude_otel && chmod 755 /usr/local/bin/claude_otel"
    assert km("shell", OBSERVED, "--root", "--", "sh", "-c", install, stdin=FAKE_CLAUDE.read_text()).returncode == 0

    ran = km("agent", "run", OBSERVED, "--prompt", "fix the flaky test", "--agent-cmd", "claude_otel", "--wait")

    assert json.loads(ran.stdout)["status"] == "complete"
    events = otel(OBSERVED, "--json")
    by_type = {event["type"]: event for event in events}
    assert by_type["user_prompt"]["prompt"] == "fix the flaky test"
    assert (by_type["api_request"]["model"], by_type["api_request"]["cost_usd"]) == ("claude-fake-1", 0.0123)
    assert (by_type["tool_decision"]["tool_name"], by_type["tool_decision"]["decision"]) == ("Bash", "accept")
    assert by_type["tool_result"]["tool_name"] == "Bash"
    assert by_type["agent_run"]["status"] == "complete"
    assert "fix the flaky test" in otel(OBSERVED, "--prompts")
    tools = otel(OBSERVED, "--tools")
    assert "Bash" in tools and "fix the flaky test" not in tools


def test_status_reports_the_capture_and_where_telemetry_goes(sandboxes: dict[str, str], local_env: Path) -> None:
    host_agent = json.loads(km("status", OBSERVED, "--json").stdout)["host_agent"]

    capture = host_agent["capture"]
    assert capture["libraries"] and capture["counters"]["lost"] == 0 and capture["peers"] == "named"
    telemetry = host_agent["telemetry"]
    assert telemetry["receiver"]["port"] == 4318 and telemetry["uploads"]["error"] is None
    uploaded = list((local_env / "artifacts" / "telemetry" / sandboxes[OBSERVED] / "logs").glob("*.json"))
    assert uploaded, "the spool is shipped to the host's artifacts directory"
