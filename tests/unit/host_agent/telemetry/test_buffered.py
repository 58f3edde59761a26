"""Events reported before telemetry is up are replayed in order, bounded, and counted when dropped."""

from __future__ import annotations

from typing import Any

from host_agent.telemetry.buffered import BufferedEvents


class Recorder:
    """Stands in for SandboxEvents: records each call by name."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Any:
        return lambda **arguments: self.calls.append((method, arguments))


def test_events_wait_for_telemetry_then_pass_straight_through() -> None:
    buffered = BufferedEvents()
    buffered.dns(name="a.test", qtype="A", decision="allowed", rcode="NOERROR", addresses=("192.0.2.1",))
    buffered.gate(decision="denied", address="192.0.2.9", port=443, protocol="tcp", pid=5, process="curl")
    recorder = Recorder()
    assert not buffered.attached

    buffered.attach(recorder)  # type: ignore[arg-type]
    buffered.tls_unobserved(pid=6, process="claude", exe="/usr/bin/claude", reason="BoringSSL")

    assert buffered.attached
    assert recorder.calls == [
        ("dns", {"name": "a.test", "qtype": "A", "decision": "allowed", "rcode": "NOERROR", "addresses": ["192.0.2.1"]}),
        ("gate", {"decision": "denied", "address": "192.0.2.9", "port": 443, "protocol": "tcp", "pid": 5, "process": "curl"}),
        ("tls_unobserved", {"pid": 6, "process": "claude", "exe": "/usr/bin/claude", "reason": "BoringSSL"}),
    ]


def test_beyond_the_bound_events_are_dropped_and_counted() -> None:
    buffered = BufferedEvents(limit=2)
    for port in (1, 2, 3, 4):
        buffered.gate(decision="denied", address="192.0.2.9", port=port, protocol="tcp", pid=5, process="nc")
    recorder = Recorder()
    buffered.attach(recorder)  # type: ignore[arg-type]

    assert [arguments["port"] for _, arguments in recorder.calls] == [1, 2]
    assert buffered.dropped == 2
