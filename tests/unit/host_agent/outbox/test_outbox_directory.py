"""The outbox end to end on the local substrate's target: a real watchdog observer, a real directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from host_agent.outbox import DirectoryTarget, Outbox
from tests.unit.host_agent.outbox.helpers import FINISHED_RUN, SANDBOX_ID, wait_until, write_atomically, write_run


class ArrivalOrder(FileSystemEventHandler):
    """Names of files as they land in the artifacts directory (DirectoryTarget renames each into place)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_moved(self, event: FileSystemEvent) -> None:
        self.names.append(os.path.basename(os.fsdecode(event.dest_path)))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    outbox = Outbox(tmp_path / "runs", SANDBOX_ID, DirectoryTarget(tmp_path / "artifacts"), tmp_path / "state", max_backoff=0.1)
    outbox.start()
    yield outbox
    outbox.stop()


def uploaded_dir(tmp_path: Path, run_id: str) -> Path:
    return tmp_path / "artifacts" / "agent-runs" / SANDBOX_ID / run_id


def test_a_finished_run_lands_byte_for_byte_with_status_last(tmp_path: Path, outbox: Outbox) -> None:
    destination = uploaded_dir(tmp_path, "run-1")
    destination.mkdir(parents=True)  # so the arrival watch is in place before the first file lands
    arrivals = ArrivalOrder()
    observer = Observer()
    observer.schedule(arrivals, destination, event_filter=[FileMovedEvent])
    observer.start()
    try:
        write_run(tmp_path / "runs", "run-1", FINISHED_RUN)
        wait_until(lambda: arrivals.names[-1:] == ["status"], what="status to land")
        assert outbox.flush(5)
    finally:
        observer.stop()
        observer.join()
    assert {p.name: p.read_bytes() for p in destination.iterdir()} == FINISHED_RUN
    assert arrivals.names.index("result.json") < arrivals.names.index("status")
    assert outbox.stats()["failed_attempts"] == 0


def test_temp_files_directories_and_hidden_runs_are_never_uploaded(tmp_path: Path, outbox: Outbox) -> None:
    runs = tmp_path / "runs"
    (runs / "run-1").mkdir(parents=True)
    (runs / "run-1" / ".result.json.tmp").write_bytes(b"half-written")
    (runs / "run-1" / ".hidden").write_bytes(b"x")
    (runs / "run-1" / "workspace").mkdir()
    (runs / "run-1" / "workspace" / "notes.txt").write_bytes(b"not a run file")
    write_atomically(runs / ".run-2.partial", "status", b"running\n")
    (runs / "stray-file").write_bytes(b"not in a run")
    write_atomically(runs / "run-1", "status", b"running\n")
    wait_until(lambda: (uploaded_dir(tmp_path, "run-1") / "status").exists(), what="status to land")
    assert outbox.flush(5)
    landed = sorted(str(p.relative_to(tmp_path / "artifacts")) for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
    assert landed == [f"agent-runs/{SANDBOX_ID}/run-1/status"]


def test_a_run_directory_moved_in_whole_is_uploaded(tmp_path: Path, outbox: Outbox) -> None:
    write_run(tmp_path / "elsewhere", "run-3", {"prompt": b"p\n", "status": b"queued\n"})
    shutil.move(tmp_path / "elsewhere" / "run-3", tmp_path / "runs" / "run-3")
    wait_until(lambda: (uploaded_dir(tmp_path, "run-3") / "status").exists(), what="status to land")
    assert (uploaded_dir(tmp_path, "run-3") / "prompt").read_bytes() == b"p\n"


def test_changes_while_the_store_is_down_are_uploaded_once_with_the_latest_content(tmp_path: Path) -> None:
    blocker = tmp_path / "artifacts"
    blocker.write_bytes(b"a file where the artifacts directory should be")  # every put fails with an OSError
    outbox = Outbox(tmp_path / "runs", SANDBOX_ID, DirectoryTarget(blocker), tmp_path / "state", max_backoff=0.05)
    outbox.start()
    try:
        for version in range(3):
            write_atomically(tmp_path / "runs" / "run-1", "result.json", f'{{"version": {version}}}'.encode())
        wait_until(lambda: outbox.stats()["failed_attempts"] >= 2, what="failed attempts")
        assert outbox.pending() == 1
        assert "NotADirectoryError" in str(outbox.stats()["last_error"]) or "FileExistsError" in str(outbox.stats()["last_error"])
        blocker.unlink()
        assert outbox.flush(5)
    finally:
        outbox.stop()
    assert (uploaded_dir(tmp_path, "run-1") / "result.json").read_bytes() == b'{"version": 2}'
    assert outbox.stats()["uploaded"] == 1
