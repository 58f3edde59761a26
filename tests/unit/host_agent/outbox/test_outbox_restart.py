"""A daemon restart loses nothing: the queue is on disk, and a scan at start finds what changed meanwhile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from host_agent.outbox import DirectoryTarget, Outbox, target_for
from host_agent.outbox.outbox import STATE_FILE
from host_agent.outbox.queue import UploadQueue
from tests.conftest import REPO_ROOT
from tests.unit.host_agent.outbox.helpers import (
    BUCKET,
    FINISHED_RUN,
    SANDBOX_ID,
    MotoServer,
    wait_until,
    write_atomically,
    write_run,
)


def persisted_pending(state_dir: Path) -> int:
    """What a new daemon would find, read through a connection of its own."""
    queue = UploadQueue(state_dir / STATE_FILE)
    try:
        return len(queue)
    finally:
        queue.close()


def test_files_pending_at_stop_are_uploaded_by_the_next_outbox(tmp_path: Path, moto_server: MotoServer) -> None:
    moto_server.stop()
    first = Outbox(tmp_path / "runs", SANDBOX_ID, target_for(f"s3://{BUCKET}"), tmp_path / "state", max_backoff=0.1)
    first.start()
    write_run(tmp_path / "runs", "run-1", FINISHED_RUN)
    wait_until(lambda: first.pending() == len(FINISHED_RUN), what="every file pending")
    wait_until(lambda: first.stats()["failed_attempts"] >= 1, what="a failed attempt")
    first.stop()
    assert persisted_pending(tmp_path / "state") == len(FINISHED_RUN)

    moto_server.start()
    moto_server.create_bucket()
    second = Outbox(tmp_path / "runs", SANDBOX_ID, target_for(f"s3://{BUCKET}"), tmp_path / "state", max_backoff=0.1)
    assert second.pending() == len(FINISHED_RUN)
    second.start()
    try:
        assert second.flush(10)
    finally:
        second.stop()
    assert {name: moto_server.read(f"agent-runs/{SANDBOX_ID}/run-1/{name}") for name in FINISHED_RUN} == FINISHED_RUN


def test_the_startup_scan_uploads_only_what_changed_while_no_outbox_ran(tmp_path: Path) -> None:
    runs, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    first = Outbox(runs, SANDBOX_ID, DirectoryTarget(artifacts), tmp_path / "state", max_backoff=0.1)
    first.start()
    write_run(runs, "run-1", FINISHED_RUN)
    uploaded = artifacts / "agent-runs" / SANDBOX_ID
    wait_until(lambda: (uploaded / "run-1" / "status").exists(), what="run-1 uploaded")
    assert first.flush(5)
    first.stop()
    inodes = {name: (uploaded / "run-1" / name).stat().st_ino for name in FINISHED_RUN}

    write_atomically(runs / "run-1", "result.json", b'{"status": "succeeded", "reviewed": true}\n')
    write_run(runs, "run-2", {"prompt": b"second\n", "status": b"queued\n"})

    second = Outbox(runs, SANDBOX_ID, DirectoryTarget(artifacts), tmp_path / "state", max_backoff=0.1)
    second.start()
    try:
        assert second.flush(5)
    finally:
        second.stop()
    assert second.stats()["uploaded"] == 3
    assert (uploaded / "run-1" / "result.json").read_bytes() == b'{"status": "succeeded", "reviewed": true}\n'
    assert (uploaded / "run-2" / "prompt").read_bytes() == b"second\n"
    assert {name: (uploaded / "run-1" / name).stat().st_ino for name in FINISHED_RUN if name != "result.json"} == {
        name: inode for name, inode in inodes.items() if name != "result.json"
    }


DAEMON = """
import sys, time
from pathlib import Path
from host_agent.outbox import DirectoryTarget, Outbox
root = Path(sys.argv[1])
Outbox(root / "runs", "sb-0123", DirectoryTarget(root / "artifacts"), root / "state", max_backoff=0.05).start()
print("started", flush=True)
time.sleep(60)
"""


def test_a_killed_daemon_loses_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "artifacts"
    blocker.write_bytes(b"a file where the artifacts directory should be")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "started"
        write_run(tmp_path / "runs", "run-1", FINISHED_RUN)
        wait_until(lambda: persisted_pending(tmp_path / "state") == len(FINISHED_RUN), what="every file queued on disk")
    finally:
        daemon.kill()  # SIGKILL: no cleanup of any kind
        daemon.wait()

    blocker.unlink()
    outbox = Outbox(tmp_path / "runs", SANDBOX_ID, DirectoryTarget(blocker), tmp_path / "state", max_backoff=0.1)
    assert outbox.pending() == len(FINISHED_RUN)
    outbox.start()
    try:
        assert outbox.flush(5)
    finally:
        outbox.stop()
    uploaded = blocker / "agent-runs" / SANDBOX_ID / "run-1"
    assert {p.name: p.read_bytes() for p in uploaded.iterdir()} == FINISHED_RUN
