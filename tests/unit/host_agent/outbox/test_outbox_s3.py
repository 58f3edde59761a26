"""The outbox against a real moto S3 server on 127.0.0.1, including the server dying mid-run."""

from __future__ import annotations

from pathlib import Path

from host_agent.outbox import Outbox, target_for
from tests.unit.host_agent.outbox.helpers import (
    BUCKET,
    FINISHED_RUN,
    SANDBOX_ID,
    MotoServer,
    wait_until,
    write_atomically,
    write_run,
)

PREFIX = "team-a"


def key(run_id: str, name: str) -> str:
    return f"{PREFIX}/agent-runs/{SANDBOX_ID}/{run_id}/{name}"


def new_outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "runs", SANDBOX_ID, target_for(f"s3://{BUCKET}/{PREFIX}/"), tmp_path / "state", max_backoff=0.2)


def test_a_finished_run_lands_in_s3_byte_for_byte(tmp_path: Path, moto_server: MotoServer) -> None:
    outbox = new_outbox(tmp_path)
    outbox.start()
    try:
        write_run(tmp_path / "runs", "run-1", FINISHED_RUN)
        wait_until(lambda: key("run-1", "status") in moto_server.keys(), what="status in S3")
        assert outbox.flush(5)
    finally:
        outbox.stop()
    assert moto_server.keys() == sorted(key("run-1", name) for name in FINISHED_RUN)
    assert {name: moto_server.read(key("run-1", name)) for name in FINISHED_RUN} == FINISHED_RUN
    assert outbox.stats()["uploaded"] == len(FINISHED_RUN)


def test_nothing_is_lost_while_the_s3_server_is_down(tmp_path: Path, moto_server: MotoServer) -> None:
    runs = tmp_path / "runs"
    outbox = new_outbox(tmp_path)
    outbox.start()
    try:
        write_run(runs, "run-1", {"prompt": b"p\n", "status": b"running\n"})
        wait_until(lambda: key("run-1", "status") in moto_server.keys(), what="the first files in S3")

        moto_server.stop()
        write_atomically(runs / "run-1", "output.jsonl", b'{"n": 1}\n')
        with (runs / "run-1" / "output.jsonl").open("ab") as output:  # a streamed output is appended, not renamed
            output.write(b'{"n": 2}\n')
        for version in range(3):
            write_atomically(runs / "run-1", "result.json", f'{{"version": {version}}}\n'.encode())
        write_atomically(runs / "run-1", "status", b"succeeded\n")
        wait_until(lambda: outbox.pending() == 3, what="three files pending")
        wait_until(lambda: outbox.stats()["failed_attempts"] >= 2, what="failed attempts")
        assert outbox.pending() == 3
        assert outbox.stats()["last_error"] is not None

        moto_server.start()  # same port; moto keeps nothing in memory across restarts
        moto_server.create_bucket()
        assert outbox.flush(10)
    finally:
        outbox.stop()
    assert moto_server.keys() == sorted(key("run-1", name) for name in ("output.jsonl", "result.json", "status"))
    assert moto_server.read(key("run-1", "output.jsonl")) == b'{"n": 1}\n{"n": 2}\n'
    assert moto_server.read(key("run-1", "result.json")) == b'{"version": 2}\n'
    assert moto_server.read(key("run-1", "status")) == b"succeeded\n"
