"""Several km processes on one state file at once: aliases stay unique, numbers never collide, CAS holds.

Each test forks real processes that wait on a barrier and then race for the same database.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from controller.state import AliasTaken, SandboxRecord, SQLiteStateStore, StateError
from tests.unit.controller.state.conftest import MakeRecord

PROCESSES = 8
CONTEXT = multiprocessing.get_context("fork")
Attempt = Callable[[], str]


def _race(attempts: list[Attempt]) -> list[str]:
    """Run each attempt in its own process, all released at once; their reports, in no particular order."""
    barrier = CONTEXT.Barrier(len(attempts))
    results: Queue[str] = CONTEXT.Queue()
    workers = [CONTEXT.Process(target=_attempt, args=(attempt, barrier, results)) for attempt in attempts]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return reports


def _attempt(attempt: Attempt, barrier: Barrier, results: Queue[str]) -> None:
    barrier.wait(timeout=30)
    try:
        results.put(attempt())
    except AliasTaken as error:
        results.put(f"taken by {error.sandbox_id}")
    except StateError as error:
        results.put(f"state error: {error}")
    except Exception as error:  # reported, so the test shows it rather than a bare exit code
        results.put(f"unexpected: {error!r}")


# Racing first opens of a new file once lost a process in about one round in eight: repeat to catch that.
@pytest.mark.parametrize("round_number", range(5))
def test_racing_for_one_alias_on_a_fresh_file_leaves_one_sandbox(
    db_path: Path, make_record: MakeRecord, round_number: int
) -> None:
    records = [make_record("goose") for _ in range(PROCESSES)]

    def insert(record: SandboxRecord) -> Attempt:
        return lambda: f"inserted {SQLiteStateStore(db_path).insert(record).sandbox_id}"

    reports = _race([insert(record) for record in records])
    winners = [report.removeprefix("inserted ") for report in reports if report.startswith("inserted ")]
    assert len(winners) == 1, reports
    assert Counter(reports)[f"taken by {winners[0]}"] == PROCESSES - 1, reports
    survivors = SQLiteStateStore(db_path).list()
    assert [(record.sandbox_id, record.number) for record in survivors] == [(winners[0], 1)]


def test_racing_with_distinct_aliases_gives_distinct_numbers(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    store.list()  # the parent's connection is open when the children fork
    records = [make_record(f"sandbox{index}") for index in range(PROCESSES)]

    def insert(record: SandboxRecord) -> Attempt:
        return lambda: str(store.insert(record).number)

    reports = _race([insert(record) for record in records])
    assert sorted(reports, key=lambda report: int(report) if report.isdigit() else 0) == [str(n) for n in range(1, 9)], reports
    listed = store.list()
    assert [record.number for record in listed] == list(range(1, PROCESSES + 1))
    assert {record.sandbox_id for record in listed} == {record.sandbox_id for record in records}


@pytest.mark.parametrize("processes", [PROCESSES])
def test_compare_and_set_lets_exactly_one_process_through(
    store: SQLiteStateStore, make_record: MakeRecord, processes: int
) -> None:
    record = store.insert(make_record(status="running"))

    def stop() -> Attempt:
        return lambda: store.update(record.sandbox_id, expected_status="running", status="stopped").status

    reports = _race([stop() for _ in range(processes)])
    assert reports.count("stopped") == 1, reports
    assert sum("is 'stopped', not 'running'" in report for report in reports) == processes - 1, reports
    assert store.get(record.sandbox_id).status == "stopped"
