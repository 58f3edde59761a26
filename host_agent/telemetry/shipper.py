"""Moves spooled telemetry to the artifacts store: `telemetry/<sandbox>/<signal>/<file>`, then deletes it.

The spool's files are complete and never change once they appear, so the directory itself is the queue:
no database, nothing to reconcile after a crash (a file uploaded but not yet deleted is uploaded again
under the same key, which replaces it). Oldest first, one thread, with backoff while the store is down;
the spool's own bound decides what is dropped if the store stays down.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from host_agent.outbox.backoff import Backoff
from host_agent.outbox.targets import UploadTarget
from host_agent.telemetry.otlp_json import SIGNALS
from host_agent.telemetry.spool import Spool

log = logging.getLogger("km-host-agent.telemetry")

SHIP_INTERVAL_SECONDS = 5.0


class TelemetryShipper:
    def __init__(
        self,
        spool: Spool,
        target: UploadTarget,
        sandbox_id: str,
        *,
        interval_seconds: float = SHIP_INTERVAL_SECONDS,
        max_backoff: float = 60.0,
    ) -> None:
        self.spool = spool
        self.target = target
        self.sandbox_id = sandbox_id
        self.interval_seconds = interval_seconds
        self._backoff = Backoff(max_backoff)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # one pass at a time: the thread's, or a flush's
        self._thread: threading.Thread | None = None
        self.shipped = 0
        self.failures = 0
        self.last_error: str | None = None

    def key(self, file: Path) -> str:
        return f"telemetry/{self.sandbox_id}/{file.parent.name}/{file.name}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ship what is there (bounded by `timeout`), then stop; what is left stays for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def ship_now(self) -> bool:
        """One pass over the spool from the caller's thread; True when it emptied the spool."""
        with self._lock:
            return self._pass()

    def pending(self) -> int:
        return sum(len(self.spool.files(signal)) for signal in SIGNALS)

    def _run(self) -> None:
        delay = self.interval_seconds
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            with self._lock:
                emptied = self._pass()
            if self._stopping.is_set():
                return
            delay = self.interval_seconds if emptied else self._backoff.failed()

    def _pass(self) -> bool:
        files = sorted((file for signal in SIGNALS for file in self.spool.files(signal)), key=lambda file: file.name)
        for file in files:
            try:
                self.target.put(self.key(file), file)
            except FileNotFoundError:
                continue  # dropped by the spool's bound meanwhile
            except Exception as error:  # the store is down or refuses: keep the file, retry later
                self.failures += 1
                if self.last_error is None:
                    log.warning("telemetry upload failing; files stay in the spool", extra={"fields": {"error": str(error)}})
                self.last_error = f"{type(error).__name__}: {error}"
                return False
            file.unlink(missing_ok=True)
            self.shipped += 1
        if self.last_error is not None:
            log.info("telemetry upload works again", extra={"fields": {"shipped": self.shipped}})
            self.last_error = None
        self._backoff.succeeded()
        return True
