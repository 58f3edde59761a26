"""The gatekeeper's bookkeeping around the gate, without a kernel: which answers it remembers as refused and
how denials are explained, what the learn report says, and what the policy fingerprint covers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ebpf.gate import GateEvent
from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.gatekeeper.component import MAX_REFUSED_ANSWERS, Gatekeeper
from host_agent.gatekeeper.resolver import QueryRecord


def config(**egress: Any) -> HostAgentConfig:
    return HostAgentConfig.model_validate(
        {
            "profile": "tiny",
            "substrate": "local",
            "region": "eu-west-1",
            "lifecycle": {"ttl_seconds": 0, "idle_timeout_seconds": 60, "teardown_policy": "destroy"},
            "execution": {"working_dir": "/workspace", "shell": "/bin/bash"},
            "egress": {"enforcement": "ebpf", "mode": "enforce", "allowed_dns_suffixes": ["allowed.test"], **egress},
        }
    )


def gatekeeper(tmp_path: Path, **egress: Any) -> Gatekeeper:
    return Gatekeeper(
        config(**egress),
        SandboxIdentity(sandbox_id="sb-1"),
        tmp_path / "cgroup",
        learn_report=tmp_path / "learn-report.json",
        pin_dir=None,
        policy_record=tmp_path / "gate-policy.json",
    )


def denial(address: str, verdict: str = "deny", **overrides: Any) -> GateEvent:
    fields: dict[str, Any] = {
        "ts_ns": 1,
        "pid": 42,
        "uid": 1000,
        "family": 4,
        "proto": "tcp",
        "verdict": verdict,
        "address": address,
        "port": 443,
        "comm": "curl",
    }
    return GateEvent(**(fields | overrides))


def refused_answer(name: str, *pairs: tuple[str, str]) -> QueryRecord:
    return QueryRecord(name, "A", True, tuple(address for address, _range in pairs), "NOERROR", pairs)


def test_a_denied_connect_to_a_refused_answer_is_explained_in_status(tmp_path: Path) -> None:
    keeper = gatekeeper(tmp_path)
    keeper._on_query(refused_answer("lan.allowed.test", ("10.0.0.5", "private")))

    keeper._on_gate_event(denial("10.0.0.5"))
    keeper._on_gate_event(denial("10.0.0.5"))
    keeper._on_gate_event(denial("198.51.100.1"))  # not a refused answer: nothing to explain

    [entry] = keeper.status()["refused_answers"]
    assert (entry["address"], entry["name"], entry["denied_connects"]) == ("10.0.0.5", "lan.allowed.test", 2)
    assert "private" in entry["reason"] and "allowedCIDRs" in entry["reason"]


def test_the_record_of_refused_answers_is_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    keeper = gatekeeper(tmp_path)
    for index in range(MAX_REFUSED_ANSWERS + 10):
        keeper._on_query(refused_answer(f"n{index}.allowed.test", (f"10.1.{index // 250}.{index % 250}", "private")))
    keeper._on_query(refused_answer("again.allowed.test", ("10.1.0.20", "private")))  # seen again: newest now

    entries = keeper.status()["refused_answers"]

    assert len(entries) == MAX_REFUSED_ANSWERS
    assert entries[-1]["address"] == "10.1.0.20" and entries[-1]["name"] == "again.allowed.test"
    assert "10.1.0.0" not in {entry["address"] for entry in entries}  # the oldest went first


def test_the_learn_report_says_why_a_connect_would_be_refused(tmp_path: Path) -> None:
    keeper = gatekeeper(tmp_path, mode="log")
    keeper._on_query(refused_answer("lan.allowed.test", ("10.0.0.5", "private"), ("127.0.0.1", "loopback")))
    keeper._on_gate_event(denial("10.0.0.5", verdict="would-deny"))
    keeper._on_gate_event(denial("0.0.0.0", hook="socket", socket_type="raw", proto="icmp", port=0))

    keeper.tick()

    entries = json.loads((tmp_path / "learn-report.json").read_text())["entries"]
    connect = next(entry for entry in entries if entry["kind"] == "connect")
    assert (connect["address"], connect["name"], connect["verdict"]) == ("10.0.0.5", "lan.allowed.test", "would-deny")
    assert "private" in connect["reason"]
    dns = next(entry for entry in entries if entry["kind"] == "dns")
    assert dns["refused"] == {"10.0.0.5": "private", "127.0.0.1": "loopback"}
    socket_entry = next(entry for entry in entries if entry["kind"] == "socket")
    assert (socket_entry["socket_type"], socket_entry["proto"], socket_entry["verdict"]) == ("raw", "icmp", "deny")


def test_the_policy_fingerprint_covers_the_mode(tmp_path: Path) -> None:
    """A restart out of learn mode must not keep what learn mode learned: the fingerprints differ."""
    learning = gatekeeper(tmp_path, mode="log")._policy_fingerprint()
    enforcing = gatekeeper(tmp_path, mode="enforce")._policy_fingerprint()

    assert learning != enforcing
    assert json.loads(enforcing) == {"suffixes": ["allowed.test"], "hosts": [], "mode": "enforce"}
