"""The persisted queue on a real SQLite file: dedupe, status-last ordering, no head-of-line blocking, reopening."""

from __future__ import annotations

from pathlib import Path

from host_agent.outbox.queue import UploadQueue
from host_agent.outbox.runfiles import Fingerprint, RunFile

RESULT = RunFile("run-1", "result.json")
STATUS = RunFile("run-1", "status")
OUTPUT = RunFile("run-1", "output.jsonl")
FP = Fingerprint(size=3, mtime_ns=1, inode=7)


def drain(queue: UploadQueue) -> list[RunFile]:
    order = []
    while (claim := queue.claim()) is not None:
        order.append(claim.run_file)
        queue.complete(claim, FP)
    return order


def test_a_file_changed_many_times_is_pending_once(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "q.sqlite3")
    for _ in range(3):
        queue.enqueue(RESULT)
        queue.enqueue(STATUS)
    assert len(queue) == 2
    assert drain(queue) == [RESULT, STATUS]
    assert len(queue) == 0


def test_status_waits_for_files_written_before_it(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "q.sqlite3")
    queue.enqueue(STATUS)  # "running"
    queue.enqueue(OUTPUT)
    queue.enqueue(RESULT)
    queue.enqueue(STATUS)  # "succeeded": must now follow result.json
    assert drain(queue) == [OUTPUT, RESULT, STATUS]


def test_status_is_held_back_while_an_earlier_file_of_its_run_keeps_failing(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "q.sqlite3")
    other_run = RunFile("run-2", "status")
    queue.enqueue(RESULT)
    queue.enqueue(STATUS)
    queue.enqueue(other_run)
    claim = queue.claim()
    assert claim is not None and claim.run_file == RESULT
    queue.defer(claim)  # result.json failed: it goes to the back, run-1's status may not overtake it
    assert drain(queue) == [other_run, RESULT, STATUS]


def test_a_change_during_the_upload_keeps_the_file_pending(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path / "q.sqlite3")
    queue.enqueue(OUTPUT)
    claim = queue.claim()
    assert claim is not None
    queue.enqueue(OUTPUT)  # appended while the upload was reading it
    queue.complete(claim, FP)
    assert len(queue) == 1
    assert queue.last_uploaded(OUTPUT) == FP
    assert drain(queue) == [OUTPUT]


def test_pending_files_and_upload_records_survive_reopening(tmp_path: Path) -> None:
    database = tmp_path / "state" / "q.sqlite3"
    queue = UploadQueue(database)
    queue.enqueue(RESULT)
    queue.enqueue(STATUS)
    claim = queue.claim()
    assert claim is not None
    queue.complete(claim, FP)
    queue.close()
    reopened = UploadQueue(database)
    assert len(reopened) == 1
    assert reopened.all_uploaded() == {RESULT: FP}
    reopened.enqueue(RunFile("run-2", "prompt"))  # sequence numbers continue past the persisted ones
    assert drain(reopened) == [STATUS, RunFile("run-2", "prompt")]
