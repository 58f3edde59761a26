"""The outbox: every run's files reach the artifact store soon after they change, and none is lost.

Three parts, one job each: a watchdog observer notices changes (watcher), a SQLite file remembers what
is still to upload and what was uploaded (queue), one thread uploads with backoff (uploader). A scan at
start catches what changed while the daemon was down.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from host_agent.outbox.queue import UploadQueue
from host_agent.outbox.runfiles import RunFile, files_in_tree, fingerprint
from host_agent.outbox.targets import UploadTarget
from host_agent.outbox.uploader import Uploader
from host_agent.outbox.watcher import WATCHED_EVENTS, RunsTreeHandler

log = logging.getLogger("km-host-agent.outbox")

STATE_FILE = "outbox.sqlite3"


class Outbox:
    """Uploads `<runs_root>/<run_id>/<file>` to `agent-runs/<sandbox_id>/<run_id>/<file>` in the target.

    Opening it reads the persisted queue (so `pending()` is meaningful before `start()`); an instance is
    started at most once. `stop()` does not wait for the queue to drain; call `flush()` first for that.
    """

    def __init__(
        self, runs_root: Path, sandbox_id: str, target: UploadTarget, state_dir: Path, *, max_backoff: float = 30.0
    ) -> None:
        self.runs_root = runs_root.absolute()
        self.sandbox_id = sandbox_id
        self.target = target
        self._queue = UploadQueue(state_dir / STATE_FILE)
        self._uploader = Uploader(self._queue, target, self.runs_root, sandbox_id, max_backoff)
        self._observer: BaseObserver | None = None
        self._started_at: float | None = None

    def start(self) -> None:
        """Watch first, then scan, then upload: a change during the scan is seen by one or the other."""
        self.runs_root.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(
            RunsTreeHandler(self.runs_root, self._changed), self.runs_root, recursive=True, event_filter=WATCHED_EVENTS
        )
        observer.daemon = True
        observer.start()
        self._observer = observer
        found = self._scan()
        self._uploader.start()
        self._started_at = time.time()
        log.info(
            "outbox started",
            extra={
                "fields": {
                    "runs_root": str(self.runs_root),
                    "target": str(self.target),
                    "changed_while_down": found,
                    "pending": self.pending(),
                }
            },
        )

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(max(0.0, deadline - time.monotonic()))
        stopped = self._uploader.stop(max(0.0, deadline - time.monotonic()))
        if stopped:
            self._queue.close()
        else:
            # A put is still running (a slow store); its thread dies with the process and the queue keeps the file.
            log.warning("outbox uploader still busy at stop", extra={"fields": {"pending": self.pending()}})
        log.info("outbox stopped", extra={"fields": {"pending": self.pending(), "uploaded": self._uploader.uploaded}})

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is pending (True) or the timeout passes (False)."""
        return self._uploader.wait_until_empty(timeout)

    def pending(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, int | float | str | None]:
        uploader = self._uploader
        return {
            "target": str(self.target),
            "pending": self.pending(),
            "uploaded": uploader.uploaded,
            "skipped_unchanged": uploader.skipped_unchanged,
            "failed_attempts": uploader.failed_attempts,
            "last_error": uploader.last_error,
            "last_error_at": uploader.last_error_at,
            "last_upload_at": uploader.last_upload_at,
            "retry_in_seconds": uploader.retry_in,
            "started_at": self._started_at,
        }

    def _changed(self, run_file: RunFile) -> None:
        self._queue.enqueue(run_file)
        self._uploader.wake()

    def _scan(self) -> int:
        """Queue every file whose content differs from its last upload; returns how many."""
        uploaded = self._queue.all_uploaded()
        found = 0
        for run_file in files_in_tree(self.runs_root):
            if fingerprint(run_file.path(self.runs_root)) != uploaded.get(run_file):
                self._queue.enqueue(run_file)
                found += 1
        return found
