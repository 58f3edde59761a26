"""The daemon's TLS capture component on real cgroups: it follows the agent slice, names peers and HTTP,
keeps plaintext out of telemetry unless asked, and reports processes whose TLS it cannot see."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from host_agent.capture.component import TlsCaptureComponent, cgroup_pids, system_libraries
from host_agent.config import TLSCapturePolicy
from host_agent.telemetry.buffered import BufferedEvents
from tests.gate.conftest import GateCgroup, cgroup2_mount, in_cgroup

root = pytest.mark.root
AGENT_SLICE = "kmagent.slice"
LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
needs_libssl = pytest.mark.skipif(not LIBSSL.exists(), reason=f"needs OpenSSL 3 at {LIBSSL}")


class Recorder:
    """What the component reports, by kind (stands in for the telemetry behind the buffer)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Any:
        return lambda **arguments: self.calls.append((method, arguments))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [arguments for method, arguments in self.calls if method == kind]


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Iterator[GateCgroup]:
    """Stands in for a sandbox's cgroup root, with its agent slice and its own services."""
    made = GateCgroup(cgroup2_mount() / f"kmcap-test-{os.getpid()}-{request.node.name[:40]}")
    made.sub(AGENT_SLICE)
    made.sub("system.slice", "km-host-agent.service")
    try:
        yield made
    finally:
        made.remove()


MakeComponent = Callable[..., tuple[TlsCaptureComponent, Recorder]]


@pytest.fixture
def component(machine: GateCgroup) -> Iterator[MakeComponent]:
    made: list[TlsCaptureComponent] = []

    def make(**policy: Any) -> tuple[TlsCaptureComponent, Recorder]:
        recorder, events = Recorder(), BufferedEvents()
        events.attach(recorder)  # type: ignore[arg-type]
        started = TlsCaptureComponent(TLSCapturePolicy(enabled=True, **policy), machine.path, events)
        started.start()
        made.append(started)
        return started, recorder

    try:
        yield make
    finally:
        for started in made:
            started.stop()


def wait_for(
    recorder: Recorder, kind: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 5
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not done(found := recorder.of(kind)):
        assert time.monotonic() < deadline, f"no matching {kind} events in {timeout} s: {recorder.calls}"
        time.sleep(0.05)
    return found


def curl(where: Path | None, port: int, path: str) -> None:
    command = ["curl", "-sk", "--http1.1", f"https://127.0.0.1:{port}{path}"]
    finished = subprocess.run(in_cgroup(where, *command) if where else command, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 0, finished.stderr


def test_the_systems_libssl_is_found_once() -> None:
    found = system_libraries()
    assert len(found) == len({path.stat().st_ino for path in found})
    if LIBSSL.exists():
        assert LIBSSL.resolve() in found


@root
@needs_libssl
def test_agent_traffic_is_reported_with_peer_and_http_but_no_plaintext(
    component: MakeComponent, machine: GateCgroup, port: int
) -> None:
    capture, recorder = component()
    assert capture.status()["libraries"], "the system libssl is probed from the start"

    curl(machine.path / AGENT_SLICE, port, "/v1/messages?token=hunter2")
    curl(None, port, "/outside-the-machine")  # the host's own traffic: never reported
    curl(machine.path / "system.slice" / "km-host-agent.service", port, "/from-the-daemon")  # the machine's services

    writes = wait_for(recorder, "tls", lambda found: any(e["direction"] == "write" for e in found))
    [write] = [event for event in writes if event["direction"] == "write"]
    assert (write["process"], write["peer"], write["payload"]) == ("curl", ("127.0.0.1", port), None)
    assert write["http"] == {"protocol": "http/1.1", "method": "GET", "path": "/v1/messages", "host": f"127.0.0.1:{port}"}
    reads = wait_for(recorder, "tls", lambda found: any(e["direction"] == "read" and e["http"] for e in found))
    assert any(event["http"] and event["http"].get("status") == 200 for event in reads)
    seen = str(recorder.of("tls"))
    assert "outside" not in seen and "from-the-daemon" not in seen
    assert capture.status()["counters"]["lost"] == 0


@root
@needs_libssl
def test_payloads_when_the_profile_asks(component: MakeComponent, machine: GateCgroup, port: int) -> None:
    _, recorder = component(capture_payloads=True, max_payload_bytes=256)

    curl(machine.path / AGENT_SLICE, port, "/v1/messages?token=hunter2")

    [write] = [
        e for e in wait_for(recorder, "tls", lambda f: any(e["direction"] == "write" for e in f)) if e["direction"] == "write"
    ]
    assert write["payload"].startswith(b"GET /v1/messages?token=hunter2 HTTP/1.1\r\n")
    assert len(write["payload"]) <= 256 and write["http"]["path"] == "/v1/messages?token=hunter2"


@root
@needs_libssl
def test_a_slice_made_after_the_capture_started_is_captured_at_once(
    component: MakeComponent, machine: GateCgroup, port: int
) -> None:
    _, recorder = component()
    (machine.path / AGENT_SLICE).rmdir()
    machine.sub(AGENT_SLICE)  # a new cgroup with a new id, as when systemd (re)starts the slice

    curl(machine.path / AGENT_SLICE, port, "/right-away")  # no tick in between

    wait_for(recorder, "tls", lambda found: any(e["http"] and e["http"].get("path") == "/right-away" for e in found))


@root
def test_a_process_with_built_in_tls_is_reported_once(component: MakeComponent, machine: GateCgroup, tmp_path: Path) -> None:
    """A copy of sleep carrying BoringSSL's marker stands in for Bun's single binary (Claude Code)."""
    capture, recorder = component()
    bun_like = tmp_path / "claude"
    shutil.copy("/bin/sleep", bun_like)
    with bun_like.open("ab") as binary:
        binary.write(b"\0BoringSSL\0")
    slice_dir = machine.path / AGENT_SLICE
    started = [subprocess.Popen(in_cgroup(slice_dir, str(bun_like), "30")) for _ in range(2)]
    plain = subprocess.Popen(in_cgroup(slice_dir, "sleep", "30"))
    try:
        deadline = time.monotonic() + 5
        while len(cgroup_pids(slice_dir)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        capture.tick()
        capture.tick()
    finally:
        for process in (*started, plain):
            process.kill()
            process.wait()

    [reported] = recorder.of("tls_unobserved")
    assert reported["exe"] == str(bun_like) and "BoringSSL" in reported["reason"]
    assert [entry["exe"] for entry in capture.status()["unobserved"]] == [str(bun_like)]


def test_unsupported_libraries_are_named_in_the_status(tmp_path: Path) -> None:
    events = BufferedEvents()
    capture = TlsCaptureComponent(TLSCapturePolicy(enabled=True, libraries=["openssl", "go", "nss"]), tmp_path, events)
    assert capture.unsupported == ["go capture is not supported yet", "nss capture is not supported yet"]
