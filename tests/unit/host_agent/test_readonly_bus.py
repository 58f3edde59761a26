"""The read-only bus the agent's units get instead of the system bus (host_agent/readonly_bus.py).

A real dbus-daemon, started by the test on a socket of its own, stands in for the system bus; real
clients (sd-bus's busctl, which sends its first message with the end of authentication, and libdbus's
dbus-send) talk to it through the proxy. In a sandbox the same proxy sits in front of PID 1's bus
(tests/sandbox/test_privileged.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.readonly_bus import Message, ReadOnlyBus, access_denied, is_allowed, message_length, parse_message

pytestmark = pytest.mark.skipif(
    not (shutil.which("dbus-daemon") and shutil.which("busctl") and shutil.which("dbus-send")),
    reason="needs dbus-daemon, busctl and dbus-send (scripts/setup.sh installs them)",
)
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def proxied_bus(tmp_path: Path) -> Iterator[tuple[ReadOnlyBus, Path]]:
    bus_socket = tmp_path / "bus"
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(path=bus_socket))
    daemon = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={config}"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not bus_socket.exists():
        assert daemon.poll() is None and time.monotonic() < deadline, "dbus-daemon did not start"
        time.sleep(0.02)
    proxy = ReadOnlyBus(listen=tmp_path / "proxy" / "bus", upstream=bus_socket, root_only=False)
    proxy.start()
    try:
        yield proxy, tmp_path / "proxy" / "bus"
    finally:
        proxy.stop()
        daemon.terminate()
        daemon.wait(timeout=10)


def busctl(address: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["busctl", f"--address=unix:path={address}", *args], capture_output=True, text=True, timeout=20)


def test_reads_go_through_for_sd_bus_and_libdbus_clients(proxied_bus: tuple[ReadOnlyBus, Path]) -> None:
    proxy, address = proxied_bus
    names = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListNames")
    assert names.returncode == 0, names.stderr
    assert "org.freedesktop.DBus" in names.stdout
    sent = subprocess.run(
        ["dbus-send", f"--bus=unix:path={address}", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
         "org.freedesktop.DBus.GetId"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert proxy.denied == 0


def test_changes_are_answered_access_denied_and_never_reach_the_bus(proxied_bus: tuple[ReadOnlyBus, Path]) -> None:
    proxy, address = proxied_bus
    owned = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                   "RequestName", "su", "com.example.Taken", "0")  # fmt: skip
    assert owned.returncode != 0
    assert "Access denied" in owned.stderr or "AccessDenied" in owned.stderr, owned.stderr
    assert proxy.denied == 1
    listed = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListNames")
    assert "com.example.Taken" not in listed.stdout  # the call never reached the bus
    start = busctl(address, "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager", "StartUnit", "ss", "x.service", "replace")  # fmt: skip
    assert "Access denied" in start.stderr or "AccessDenied" in start.stderr, start.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_root_is_served_by_default(tmp_path: Path) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.bind(str(tmp_path / "upstream"))
    upstream.listen(1)
    reachable = Path(tempfile.mkdtemp(prefix="km-bus-test-"))  # pytest's tmp_path is closed to other users
    reachable.chmod(0o755)
    proxy = ReadOnlyBus(listen=reachable / "bus", upstream=tmp_path / "upstream")
    proxy.start()
    try:
        script = (
            "import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
            f"s.connect({str(reachable / 'bus')!r}); s.sendall(b'\\0AUTH EXTERNAL 3635353334\\r\\nBEGIN\\r\\n'); "
            "print(repr(s.recv(100)))"
        )
        result = subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=20)
        # closed without a word (an orderly close, or a reset since the proxy read nothing)
        assert result.stdout.strip() == "b''" or "ConnectionResetError" in result.stderr, result.stdout + result.stderr
        upstream.settimeout(0.5)
        with pytest.raises(TimeoutError):
            upstream.accept()  # the proxy never opened a bus connection for it
    finally:
        proxy.stop()
        upstream.close()
        shutil.rmtree(reachable)


def test_the_error_reply_is_a_well_formed_answer_to_the_call() -> None:
    call = Message(kind=1, serial=7, little_endian=True, path="/", interface="a.b", member="C", carries_fds=False)
    reply = access_denied(call)
    assert message_length(reply) == len(reply)
    parsed = parse_message(reply)
    assert parsed.kind == 3 and parsed.carries_fds is False
    assert b"org.freedesktop.DBus.Error.AccessDenied" in reply and b"a.b.C" in reply


@pytest.mark.parametrize(
    ("kind", "interface", "member", "fds", "allowed"),
    [
        (1, "org.freedesktop.DBus.Properties", "Get", False, True),
        (1, "org.freedesktop.DBus.Properties", "Set", False, False),
        (1, "org.freedesktop.systemd1.Manager", "GetUnit", False, True),
        (1, "org.freedesktop.systemd1.Manager", "StartTransientUnit", False, False),
        (1, "org.freedesktop.systemd1.Unit", "Start", False, False),
        (1, "org.freedesktop.DBus", "BecomeMonitor", False, False),
        (1, "org.freedesktop.DBus", "StartServiceByName", False, False),
        (1, None, "GetUnit", False, False),
        (1, "org.freedesktop.systemd1.Manager", "GetUnit", True, False),
        (2, None, None, False, True),
        (4, "org.example", "Signal", False, False),
    ],
)
def test_only_reads_and_replies_pass(kind: int, interface: str | None, member: str | None, fds: bool, allowed: bool) -> None:
    message = Message(kind=kind, serial=1, little_endian=True, path="/", interface=interface, member=member, carries_fds=fds)
    assert is_allowed(message) is allowed
