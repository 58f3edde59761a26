"""The daemon's TLS capture: probes on every libssl the agent's processes use, events to telemetry.

The kernel filter targets the machine's cgroup root and exempts the machine's own services (system.slice
and init.scope) and the operator's slice (`km shell --root`): the agent slice, where runs and `km shell`
go, is captured from the moment systemd creates it, however often it is recreated, while the daemon's
uploads and the operator's root shells are not. (The egress gate exempts less: it gates machine
services too, which capture has no reason to record.)

Libraries: the system's libssl files are probed at start, so a short-lived `curl` is seen from its
first call; each tick then looks at the agent's processes for libssl files elsewhere (a bundled copy),
and for executables that export OpenSSL's functions themselves (Node links OpenSSL statically and
exports it). A process whose TLS cannot be seen is reported once per executable, with the reason.

Without payloads the kernel still copies a small window of each call, parsed here for the HTTP method,
host and status and then dropped; only a profile with capturePayloads exports plaintext, and without
it the path is reported without its query string, where tokens often travel.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host_agent.capture.coalesce import Coalescer, TlsReport
from host_agent.capture.unobservable import ExecutableScanner, reason_from_libraries
from host_agent.config import TLSCapturePolicy
from host_agent.containment import OPERATOR_SLICE
from host_agent.telemetry.buffered import BufferedEvents

if TYPE_CHECKING:
    from ebpf.tls_capture import TlsCapture, TlsEvent

log = logging.getLogger("km-host-agent.capture")

EXEMPT_CGROUPS = ("system.slice", "init.scope", OPERATOR_SLICE)  # the machine's services, the operator's shells
PARSE_WINDOW_BYTES = 512  # what the kernel copies for HTTP naming when payloads are not exported
SYSTEM_LIBSSL_PATTERNS = ("/usr/lib/*-linux-gnu/libssl.so*", "/usr/lib64/libssl.so*", "/usr/lib/libssl.so*")
UNSUPPORTED_LIBRARIES = {
    "gnutls": "gnutls capture is not supported yet",
    "nss": "nss capture is not supported yet",
    "go": "go capture is not supported yet",
    "rustls": "rustls capture is not supported yet",
}


class CaptureError(Exception):
    """The capture could not start; the daemon reports it and runs on without capture."""


def system_libraries(patterns: tuple[str, ...] = SYSTEM_LIBSSL_PATTERNS) -> list[Path]:
    """The machine's libssl files, one path per file (symlinks resolved)."""
    found: dict[tuple[int, int], Path] = {}
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            path = Path(name).resolve()
            try:
                identity = path.stat()
            except OSError:
                continue
            found.setdefault((identity.st_dev, identity.st_ino), path)
    return list(found.values())


def cgroup_pids(directory: Path, exclude: tuple[str, ...] = ()) -> set[int]:
    """Every process in a cgroup v2 directory and below it, except under the `exclude` children of the
    directory itself; a directory removed meanwhile has none."""
    pids: set[int] = set()
    for parent, children, files in os.walk(directory):
        if parent == str(directory):
            children[:] = [child for child in children if child not in exclude]
        if "cgroup.procs" in files:
            try:
                pids.update(int(line) for line in Path(parent, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
    return pids


class TlsCaptureComponent:
    def __init__(self, policy: TLSCapturePolicy, cgroup_root: Path, events: BufferedEvents) -> None:
        self.policy = policy
        self.cgroup_root = cgroup_root
        self.events = events
        self.capture: TlsCapture | None = None
        self.unobserved: dict[str, dict[str, Any]] = {}  # by executable path
        self.unsupported = [UNSUPPORTED_LIBRARIES[name] for name in policy.libraries if name in UNSUPPORTED_LIBRARIES]
        self._scanner = ExecutableScanner()
        self._not_libssl: set[tuple[int, int]] = set()  # executables known to export no OpenSSL
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        from ebpf.tls_capture import MAX_PAYLOAD_BYTES, TlsCapture, TlsCaptureError

        window = min(self.policy.max_payload_bytes, MAX_PAYLOAD_BYTES) if self.policy.capture_payloads else PARSE_WINDOW_BYTES
        pid_ns = os.stat("/proc/self/ns/pid")
        try:
            self.capture = TlsCapture(payload_bytes=window, pidns=(pid_ns.st_dev, pid_ns.st_ino))
        except TlsCaptureError as error:
            raise CaptureError(str(error)) from error
        for library in system_libraries():
            self._attach(library)
        try:
            self.capture.add_target(self.cgroup_root)
            for name in EXEMPT_CGROUPS:
                if (self.cgroup_root / name).is_dir():
                    self.capture.add_exempt(self.cgroup_root / name)
        except TlsCaptureError as error:
            self.capture.close()
            self.capture = None
            raise CaptureError(str(error)) from error
        self._reader = threading.Thread(target=self._read_events, name="tls-capture", daemon=True)
        self._reader.start()
        for message in self.unsupported:
            log.warning("tlsCapture.libraries: %s", message)
        if self.capture.peers_unknown:
            log.warning("TLS capture: %s", self.capture.peers_unknown)
        log.info(
            "TLS capture started",
            extra={
                "fields": {
                    "target": str(self.cgroup_root),
                    "exempt": list(EXEMPT_CGROUPS),
                    "libraries": [str(path) for path in self.capture.libraries()],
                    "payload_bytes": window if self.policy.capture_payloads else 0,
                }
            },
        )

    def stop(self) -> None:
        self._stopping.set()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def tick(self) -> None:
        """Look at the agent's processes: new libraries get probes, blind spots get reported."""
        if self.capture is None:
            return
        pids = cgroup_pids(self.cgroup_root, exclude=EXEMPT_CGROUPS)
        from ebpf.tls_capture import libraries_in_use

        for library in libraries_in_use(pids):
            self._attach(library)
        for pid in pids:
            self._look_at_process(pid)

    def status(self) -> dict[str, Any]:
        capture = self.capture
        return {
            "enabled": True,
            "target": str(self.cgroup_root),
            "exempt": list(EXEMPT_CGROUPS),
            "libraries": [str(path) for path in capture.libraries()] if capture else [],
            "counters": capture.counters() if capture else {},
            "payloads": self.policy.capture_payloads,
            "peers": None if capture is None else (capture.peers_unknown or "named"),
            "unobserved": list(self.unobserved.values()),
            "unsupported": self.unsupported,
        }

    # ---- work -------------------------------------------------------------------------------------
    def _attach(self, library: Path) -> None:
        from ebpf.tls_capture import TlsCaptureError

        assert self.capture is not None
        try:
            if self.capture.attach_library(library):
                log.info("TLS capture probes attached", extra={"fields": {"library": str(library)}})
        except TlsCaptureError as error:
            log.warning("cannot probe a TLS library", extra={"fields": {"library": str(library), "error": str(error)}})

    def _look_at_process(self, pid: int) -> None:
        """Probe an executable that exports OpenSSL itself; report one whose TLS cannot be seen."""
        from ebpf.tls_capture import function_offsets, same_file, ssl_mappings

        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            executable = Path(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            return
        if ssl_mappings(maps):
            return  # its libssl is probed (libraries_in_use)
        exe_path = Path(f"/proc/{pid}/exe")
        try:
            identity = os.stat(exe_path)
        except OSError:
            return
        key = (identity.st_dev, identity.st_ino)
        if key not in self._not_libssl:
            try:
                exports_openssl = bool(function_offsets(exe_path, ["SSL_write", "SSL_read"]))
            except (OSError, ValueError, IndexError):
                exports_openssl = False
            if exports_openssl:  # probed by its own path when that is still the same file
                self._attach(executable if same_file(executable, identity) else exe_path)
                return
            self._not_libssl.add(key)
        reason = reason_from_libraries(maps) or self._scanner.reason(exe_path)
        if reason is None or str(executable) in self.unobserved:
            return
        try:
            process = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            process = executable.name
        self.unobserved[str(executable)] = {"exe": str(executable), "process": process, "reason": reason}
        log.warning(
            "TLS of a process cannot be captured", extra={"fields": {"pid": pid, "exe": str(executable), "reason": reason}}
        )
        self.events.tls_unobserved(pid=pid, process=process, exe=str(executable), reason=reason)

    def _read_events(self) -> None:
        coalescer = Coalescer()
        while not self._stopping.is_set():
            capture = self.capture
            if capture is None:
                break
            try:
                captured = capture.poll(100)
            except Exception:  # the reader must never take the daemon down
                log.exception("reading TLS capture events failed")
                time.sleep(1)
                continue
            for event in captured:
                self._send(coalescer.add(self._report(event), event.connection))
            self._send(coalescer.due(time.time()))
        self._send(coalescer.drain())

    def _report(self, event: TlsEvent) -> TlsReport:
        from ebpf.tls_capture import describe_http

        http = describe_http(event.payload) if event.payload else None
        if http is not None and not self.policy.capture_payloads and isinstance(http.get("path"), str):
            http = {**http, "path": str(http["path"]).split("?", 1)[0]}
        return TlsReport(
            time=event.time,
            pid=event.pid,
            process=event.comm,
            direction=event.direction,
            size=event.size,
            peer=event.peer,
            http=http,
            payload=event.payload if self.policy.capture_payloads else None,
        )

    def _send(self, reports: list[TlsReport]) -> None:
        for report in reports:
            self.events.tls(
                time=report.time,
                pid=report.pid,
                process=report.process,
                direction=report.direction,
                size=report.size,
                peer=report.peer,
                http=report.http,
                payload=report.payload,
                calls=report.calls,
            )
