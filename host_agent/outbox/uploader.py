"""The uploader thread: takes pending run files from the queue, one at a time, and puts them in the target.

It never gives up on a file that still exists: a failed put leaves the file queued and the thread waits
(exponential backoff) before the next attempt. It owns no state that matters across restarts; the queue does.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from host_agent.outbox.backoff import Backoff
from host_agent.outbox.queue import Claim, UploadQueue
from host_agent.outbox.runfiles import fingerprint
from host_agent.outbox.targets import UploadTarget

log = logging.getLogger("km-host-agent.outbox")


class Uploader:
    def __init__(self, queue: UploadQueue, target: UploadTarget, runs_root: Path, sandbox_id: str, max_backoff: float) -> None:
        self._queue = queue
        self._target = target
        self._runs_root = runs_root
        self._sandbox_id = sandbox_id
        self._backoff = Backoff(max_backoff)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="km-outbox-uploader", daemon=True)
        self.uploaded = 0
        self.skipped_unchanged = 0
        self.failed_attempts = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_upload_at: float | None = None
        self.retry_in: float | None = None

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something was enqueued. Does not cut a backoff short: a change does not mean the store is back."""
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to stop and wait for it; False if a put was still running at the deadline."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_until_empty(self, timeout: float) -> bool:
        with self._progress:
            return self._progress.wait_for(lambda: len(self._queue) == 0, timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                claim = self._queue.claim()
                if claim is None:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._attempt(claim)
            except Exception as error:  # The queue's disk failed; the thread must outlive it, backing off.
                log.exception("outbox queue error", extra={"fields": {"error": str(error)}})
                self._stopping.wait(self._backoff.failed())
            finally:
                with self._progress:
                    self._progress.notify_all()

    def _attempt(self, claim: Claim) -> None:
        run_file = claim.run_file
        source = run_file.path(self._runs_root)
        key = run_file.key(self._sandbox_id)
        # Taken before the read, so the recorded fingerprint is never newer than what was uploaded.
        before = fingerprint(source)
        if before is None:
            self._queue.complete(claim, None)
            log.info("run file gone before upload; dropped", extra={"fields": {"key": key}})
            return
        if before == self._queue.last_uploaded(run_file):
            self._queue.complete(claim, before)
            self.skipped_unchanged += 1
            return
        try:
            self._target.put(key, source)
        except Exception as error:  # OSError, botocore's many error types: all mean "not stored yet".
            if fingerprint(source) is None:
                self._queue.complete(claim, None)
                return
            self._failed(claim, key, error)
            return
        self._queue.complete(claim, before)
        self.uploaded += 1
        self.last_upload_at = time.time()
        if self._backoff.failures:
            log.info(
                "artifact store reachable again",
                extra={"fields": {"target": str(self._target), "failures": self._backoff.failures}},
            )
        self._backoff.succeeded()
        self.retry_in = None
        log.debug("uploaded", extra={"fields": {"key": key, "bytes": before.size}})

    def _failed(self, claim: Claim, key: str, error: Exception) -> None:
        self._queue.defer(claim)
        delay = self._backoff.failed()
        self.failed_attempts += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_error_at = time.time()
        self.retry_in = delay
        log.warning(
            "upload failed; will retry",
            extra={
                "fields": {
                    "key": key,
                    "target": str(self._target),
                    "error": self.last_error,
                    "consecutive_failures": self._backoff.failures,
                    "retry_in_seconds": round(delay, 3),
                    "pending": len(self._queue),
                }
            },
        )
        self._stopping.wait(delay)
