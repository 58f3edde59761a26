"""The systemd notification protocol: one datagram per state change to $NOTIFY_SOCKET.

Small enough to own rather than depend on: a unit of `Type=notify` is only "started" once the daemon
says READY=1, and `WatchdogSec=` restarts it unless it says WATCHDOG=1 in time.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send `KEY=value` states; False when not running under systemd (no socket), which is not an error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(states).encode())
    return True


def watchdog_interval_seconds() -> float | None:
    """Half of WatchdogSec (systemd's advice), or None when no watchdog is armed for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
