"""The SQLite state store on a real file: the shared store contract, then what is SQLite's own (the file, its
schema and locks, fork)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from controller.state import SandboxRecord, SQLiteStateStore, StateError
from tests.unit.controller.state.conftest import CREATED, MakeRecord
from tests.unit.controller.state.contract import StateStoreContract


class TestSQLiteStateStore(StateStoreContract):
    """The shared contract, on a real file (fixtures in conftest.py)."""


# --- storage -----------------------------------------------------------------------------------


def test_timestamps_are_stored_as_iso_utc_text_and_resources_as_json(
    store: SQLiteStateStore, db_path: Path, make_record: MakeRecord
) -> None:
    store.insert(make_record(ttl_expiry=CREATED + timedelta(hours=4), resources={"netns": "km-goose"}))
    with sqlite3.connect(db_path) as raw:
        created, expiry, resources = raw.execute("SELECT created_at, ttl_expiry, resources FROM sandboxes").fetchone()
    assert (created, expiry, resources) == ("2025-05-01T12:00:00Z", "2025-05-01T16:00:00Z", '{"netns": "km-goose"}')


# --- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=oct)
def test_directory_and_files_are_private_whatever_the_umask(tmp_path: Path, make_record: MakeRecord, umask: int) -> None:
    db_path = tmp_path / "km" / "state.db"
    previous = os.umask(umask)
    try:
        store = SQLiteStateStore(db_path)
        store.insert(make_record())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    for sidecar in (db_path.with_name("state.db-wal"), db_path.with_name("state.db-shm")):
        assert sidecar.exists(), "WAL mode keeps these while a connection is open"
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    store.close()


def test_an_existing_directory_keeps_its_mode(tmp_path: Path, make_record: MakeRecord) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    SQLiteStateStore(shared / "state.db").insert(make_record())
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_nothing_is_created_until_first_use(db_path: Path) -> None:
    SQLiteStateStore(db_path)
    assert not db_path.parent.exists()


def test_schema(store: SQLiteStateStore, db_path: Path) -> None:
    store.list()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (1,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in raw.execute("PRAGMA table_info(sandboxes)")]
        unique = {
            raw.execute(f"PRAGMA index_info({name})").fetchone()[2]
            for _, name, is_unique, *_ in raw.execute("PRAGMA index_list(sandboxes)")
            if is_unique
        }
    assert sorted(columns) == sorted(SandboxRecord.model_fields)
    assert {"sandbox_id", "alias", "number"} <= unique


def test_a_database_from_a_newer_km_is_refused(db_path: Path) -> None:
    SQLiteStateStore(db_path).list()
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="schema version 99.*upgrade km"):
        SQLiteStateStore(db_path).list()


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match=str(path)):
        SQLiteStateStore(path).list()


def test_a_writer_waits_for_another_process_lock(store: SQLiteStateStore, db_path: Path, make_record: MakeRecord) -> None:
    store.list()
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(1.0, lambda: other.execute("COMMIT"))
    releaser.start()
    started = time.monotonic()
    try:
        assert store.insert(make_record()).number == 1
    finally:
        releaser.join()
        other.close()
    assert time.monotonic() - started >= 0.9, "the insert should have waited for the lock, not failed or skipped it"


def test_close_then_use_again(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record())
    store.close()
    assert store.get(record.sandbox_id) == record


# --- fork --------------------------------------------------------------------------------------


def _insert_in_child(store: SQLiteStateStore, record: SandboxRecord, parent_connection: sqlite3.Connection) -> None:
    # White-box: reusing the parent's connection usually works and corrupts only under unlucky lock timing,
    # so the test checks the child opened its own rather than waiting for that luck.
    if store._connect() is parent_connection:
        raise SystemExit(3)
    store.insert(record)
    store.list()


def test_a_store_used_before_fork_works_in_the_child_and_after_in_the_parent(
    store: SQLiteStateStore, make_record: MakeRecord
) -> None:
    parent_record = store.insert(make_record("parent"))
    arguments = (store, make_record("child"), store._connect())
    child = multiprocessing.get_context("fork").Process(target=_insert_in_child, args=arguments)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert [record.alias for record in store.list()] == ["parent", "child"]
    assert store.update(parent_record.sandbox_id, status="running").status == "running"
