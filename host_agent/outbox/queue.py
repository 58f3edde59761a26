"""The outbox's memory: which run files still have to be uploaded, and what was last uploaded for each.

Both live in one SQLite file in the state directory. Every change is one transaction, so a kill -9 at
any point leaves either the old or the new state, never half of one, and a restarted daemon resumes
exactly where the old one stopped.

A file is pending at most once however often it changes (the upload reads its latest content). Each
pending row has two sequence numbers from one counter:
- `since`, the first change not yet uploaded: `status` is held back while another file of its run has
  an older `since`, so a reader who sees a final status also finds the result.json written before it.
  A `status` rewrite moves its `since` forward, since its new content must follow what was written meanwhile.
- `position`, the service order: first come, first served, and a failed file goes to the back so one
  unreadable file does not hold up the other runs.
`revision` counts changes; an upload only clears the row if no change arrived while it was in flight.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from host_agent.outbox.runfiles import STATUS, Fingerprint, RunFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    since INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS uploaded (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""

# The oldest eligible file: anything but a status, or a status with nothing older pending in its run.
_NEXT = """
SELECT run_id, name, revision FROM pending AS p
WHERE p.name != :status OR NOT EXISTS (
    SELECT 1 FROM pending AS q WHERE q.run_id = p.run_id AND q.name != :status AND q.since < p.since
)
ORDER BY position LIMIT 1
"""


@dataclass(frozen=True)
class Claim:
    """A pending file handed to the uploader, with the revision it saw."""

    run_file: RunFile
    revision: int


class UploadQueue:
    """Thread-safe: the watchdog thread enqueues while the uploader thread claims and completes."""

    def __init__(self, database: Path) -> None:
        database.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; each change below is one explicit transaction.
        self._db = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        rows = self._db.execute("SELECT run_id, name FROM pending").fetchall()
        self._pending = {RunFile(run_id, name) for run_id, name in rows}
        self._in_flight: RunFile | None = None
        (self._sequence,) = self._db.execute("SELECT COALESCE(MAX(MAX(since), MAX(position)), 0) FROM pending").fetchone()

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def enqueue(self, run_file: RunFile) -> None:
        """Note that a file changed. Idempotent while it waits: the upload will read its latest content."""
        with self._lock:
            if run_file in self._pending and run_file != self._in_flight and run_file.name != STATUS:
                return  # Spares a disk write per append to a streamed output file.
            self._sequence += 1
            moves_forward = run_file.name == STATUS
            self._db.execute(
                "INSERT INTO pending (run_id, name, revision, since, position) VALUES (?, ?, 0, ?, ?) "
                "ON CONFLICT (run_id, name) DO UPDATE SET revision = revision + 1"
                + (", since = excluded.since, position = excluded.position" if moves_forward else ""),
                (run_file.run_id, run_file.name, self._sequence, self._sequence),
            )
            self._pending.add(run_file)

    def claim(self) -> Claim | None:
        """The next file to upload, or None when nothing is eligible."""
        with self._lock:
            row = self._db.execute(_NEXT, {"status": STATUS}).fetchone()
            if row is None:
                return None
            run_id, name, revision = row
            self._in_flight = RunFile(run_id, name)
            return Claim(self._in_flight, revision)

    def complete(self, claim: Claim, uploaded: Fingerprint | None) -> None:
        """The claimed file is done: uploaded with this fingerprint, or (None) gone and not worth uploading."""
        run_id, name = claim.run_file.run_id, claim.run_file.name
        with self._lock:
            self._in_flight = None
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cleared = self._db.execute(
                    "DELETE FROM pending WHERE run_id = ? AND name = ? AND revision = ?", (run_id, name, claim.revision)
                ).rowcount
                if uploaded is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO uploaded (run_id, name, size, mtime_ns, inode) VALUES (?, ?, ?, ?, ?)",
                        (run_id, name, *uploaded),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if cleared:
                self._pending.discard(claim.run_file)

    def defer(self, claim: Claim) -> None:
        """The upload failed: keep the file, behind everything else that is waiting."""
        with self._lock:
            self._in_flight = None
            self._sequence += 1
            self._db.execute(
                "UPDATE pending SET position = ? WHERE run_id = ? AND name = ?",
                (self._sequence, claim.run_file.run_id, claim.run_file.name),
            )

    def last_uploaded(self, run_file: RunFile) -> Fingerprint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, inode FROM uploaded WHERE run_id = ? AND name = ?", (run_file.run_id, run_file.name)
            ).fetchone()
        return Fingerprint(*row) if row else None

    def all_uploaded(self) -> dict[RunFile, Fingerprint]:
        """Every recorded upload, read at once for the startup scan."""
        with self._lock:
            rows = self._db.execute("SELECT run_id, name, size, mtime_ns, inode FROM uploaded").fetchall()
        return {RunFile(run_id, name): Fingerprint(size, mtime_ns, inode) for run_id, name, size, mtime_ns, inode in rows}
