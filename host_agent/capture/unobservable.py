"""Which TLS stacks the libssl probes cannot see, told from a process's executable and mapped libraries.

Claude Code ships as a Bun binary with BoringSSL built in; Go and Rust programs carry crypto/tls and
rustls; some programs link GnuTLS or NSS. None of them calls libssl's SSL_write, so their traffic is
invisible to the capture. An operator must be told which processes those are, rather than reading an
empty capture as "no traffic". A marker string in the executable names the stack; each executable
(by device and inode) is read once.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

# (marker in the executable, what the operator is told). Checked in order; the first that matches wins.
_EXECUTABLE_MARKERS: tuple[tuple[bytes, str], ...] = (
    (b"BoringSSL", "statically linked BoringSSL (Bun, as in Claude Code): use its own telemetry (claudeTelemetry)"),
    (b"crypto/tls.(*Conn)", "Go crypto/tls: go capture is not supported yet"),
    (b"rustls", "rustls: rustls capture is not supported yet"),
)
_LIBRARY_MARKERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"libgnutls\.so"), "GnuTLS: gnutls capture is not supported yet"),
    (re.compile(r"libnss3\.so|libssl3\.so"), "NSS: nss capture is not supported yet"),
)
MAX_SCANNED_BYTES = 512 * 1024 * 1024


def reason_from_libraries(maps: str) -> str | None:
    """A TLS library other than OpenSSL's in a /proc/<pid>/maps text."""
    for pattern, reason in _LIBRARY_MARKERS:
        if pattern.search(maps):
            return reason
    return None


class ExecutableScanner:
    """Reads each executable once for a built-in TLS stack; remembers the answer by device and inode."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], str | None] = {}

    def reason(self, executable: Path) -> str | None:
        try:
            identity = os.stat(executable)
        except OSError:
            return None
        key = (identity.st_dev, identity.st_ino)
        if key not in self._seen:
            self._seen[key] = _scan(executable, identity.st_size)
        return self._seen[key]


def _scan(executable: Path, size: int) -> str | None:
    if size == 0 or size > MAX_SCANNED_BYTES:
        return None
    try:
        with executable.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
            for marker, reason in _EXECUTABLE_MARKERS:
                if image.find(marker) != -1:
                    return reason
    except (OSError, ValueError):
        return None
    return None
