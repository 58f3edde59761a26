"""The SQLite state store on a real file: round trips, list numbers, references, updates, deletes and files."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controller.state import AliasTaken, SandboxNotFound, SandboxRecord, SQLiteStateStore, StateError
from tests.unit.controller.state.conftest import CREATED, MakeRecord

# --- round trips -------------------------------------------------------------------------------


def test_every_field_round_trips(store: SQLiteStateStore, db_path: Path, make_record: MakeRecord) -> None:
    plus_two = timezone(timedelta(hours=2))
    record = make_record(
        alias="goose-dev",
        profile="goose",
        profile_file="/home/op/profiles/goose.yaml",
        substrate="ec2",
        region="eu-west-1",
        status="running",
        plan_hash="sha256:aaa",
        runtime_hash="sha256:bbb",
        policy_hash="sha256:ccc",
        created_at=datetime(2025, 5, 1, 14, 0, 0, 123456, tzinfo=plus_two),
        updated_at=datetime(2025, 5, 1, 12, 30, tzinfo=UTC),
        ttl_expiry=datetime(2025, 5, 2, 0, 0, tzinfo=plus_two),
        idle_timeout_seconds=900,
        teardown_policy="retain",
        locked=True,
        failure_reason="spot instance reclaimed",
        resources={"instance_id": "i-0123456789abcdef0", "address": "10.0.0.7", "note": 'quotes " and ünïcode'},
    )
    stored = store.insert(record)
    assert stored == record.model_copy(update={"number": 1})
    reopened = SQLiteStateStore(db_path)
    for reading in (store.get(record.sandbox_id), reopened.get(record.sandbox_id), reopened.list()[0]):
        assert reading == stored
        assert reading.created_at.tzinfo is not None and reading.created_at.utcoffset() == timedelta(0)
        assert reading.created_at == datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    reopened.close()


def test_optional_fields_round_trip_as_none(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    stored = store.insert(make_record(profile_file=None, ttl_expiry=None, idle_timeout_seconds=None, failure_reason=None))
    assert store.get(stored.sandbox_id) == stored
    assert stored.resources == {} and stored.locked is False


def test_timestamps_are_stored_as_iso_utc_text_and_resources_as_json(
    store: SQLiteStateStore, db_path: Path, make_record: MakeRecord
) -> None:
    store.insert(make_record(ttl_expiry=CREATED + timedelta(hours=4), resources={"netns": "km-goose"}))
    with sqlite3.connect(db_path) as raw:
        created, expiry, resources = raw.execute("SELECT created_at, ttl_expiry, resources FROM sandboxes").fetchone()
    assert (created, expiry, resources) == ("2025-05-01T12:00:00Z", "2025-05-01T16:00:00Z", '{"netns": "km-goose"}')


# --- list numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["+a", "+b", "+c"], {"a": 1, "b": 2, "c": 3}),
        (["+a", "+b", "+c", "-b", "+d"], {"a": 1, "c": 3, "d": 2}),
        (["+a", "+b", "+c", "-a", "-b", "+d", "+e", "+f"], {"c": 3, "d": 1, "e": 2, "f": 4}),
        (["+a", "+b", "-b", "+c"], {"a": 1, "c": 2}),
        (["+a", "-a", "+b"], {"b": 1}),
        (["+a", "+b", "+c", "-c", "+d"], {"a": 1, "b": 2, "d": 3}),
    ],
    ids=["in-order", "gap-reused", "lowest-gap-first", "last-freed", "emptied", "top-freed"],
)
def test_numbers_are_the_lowest_free(
    store: SQLiteStateStore, make_record: MakeRecord, steps: list[str], expected: dict[str, int]
) -> None:
    ids: dict[str, str] = {}
    for step in steps:
        alias = step[1:]
        if step[0] == "+":
            ids[alias] = store.insert(make_record(alias)).sandbox_id
        else:
            store.delete(ids.pop(alias))
    listed = store.list()
    assert {record.alias: record.number for record in listed} == expected
    assert [record.number for record in listed] == sorted(expected.values())


def test_a_number_stays_taken_until_its_row_is_deleted(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    first = store.insert(make_record("a"))
    store.insert(make_record("b"))
    store.update(first.sandbox_id, status="destroying")
    assert store.insert(make_record("c")).number == 3
    store.delete(first.sandbox_id)
    assert store.insert(make_record("d")).number == 1


def test_a_number_given_by_the_caller_is_replaced(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    assert store.insert(make_record(number=7)).number == 1


# --- aliases and ids ---------------------------------------------------------------------------


def test_alias_taken(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    holder = store.insert(make_record("goose"))
    with pytest.raises(AliasTaken) as caught:
        store.insert(make_record("goose"))
    assert (caught.value.alias, caught.value.sandbox_id) == ("goose", holder.sandbox_id)
    assert "'goose'" in str(caught.value) and holder.sandbox_id in str(caught.value) and "--alias" in str(caught.value)
    assert store.list() == [holder]
    assert store.insert(make_record("other")).number == 2, "a refused insert must not use up a number"


def test_alias_is_free_again_after_delete(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    store.delete(store.insert(make_record("goose")).sandbox_id)
    assert store.insert(make_record("goose")).alias == "goose"


def test_duplicate_id_is_refused(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record("a"))
    with pytest.raises(StateError, match=record.sandbox_id):
        store.insert(make_record("b", sandbox_id=record.sandbox_id))
    assert len(store.list()) == 1


def test_find_by_alias(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record("goose"))
    assert store.find_by_alias("goose") == record
    assert store.find_by_alias("gander") is None


def test_get_unknown_id(store: SQLiteStateStore) -> None:
    with pytest.raises(SandboxNotFound) as caught:
        store.get("sb-00000000")
    assert caught.value.ref == "sb-00000000"
    assert "sb-00000000" in str(caught.value) and "km list" in str(caught.value)


# --- resolve -----------------------------------------------------------------------------------


@pytest.fixture
def three(store: SQLiteStateStore, make_record: MakeRecord) -> list[SandboxRecord]:
    """Three sandboxes numbered 1..3: aliases goose, codex, claude."""
    return [store.insert(make_record(alias)) for alias in ("goose", "codex", "claude")]


@pytest.mark.parametrize(("ref", "index"), [("goose", 0), ("claude", 2), ("1", 0), ("#1", 0), ("3", 2), ("#2", 1)])
def test_resolve_by_alias_or_number(store: SQLiteStateStore, three: list[SandboxRecord], ref: str, index: int) -> None:
    assert store.resolve(ref) == three[index]


def test_resolve_by_id(store: SQLiteStateStore, three: list[SandboxRecord]) -> None:
    assert store.resolve(three[1].sandbox_id) == three[1]


@pytest.mark.parametrize(
    ("ref", "tried"),
    [
        ("nope", "as an id or alias"),
        ("9", "as an id, alias or list number"),
        ("#9", "as a list number"),
        ("#0", "as a list number"),
        ("0", "as an id or alias"),
        ("#goose", "as a list number"),
        ("", "as an id or alias"),
    ],
)
def test_resolve_unknown_says_what_was_tried(store: SQLiteStateStore, three: list[SandboxRecord], ref: str, tried: str) -> None:
    with pytest.raises(SandboxNotFound) as caught:
        store.resolve(ref)
    assert caught.value.ref == ref
    assert f"{ref!r} {tried}" in str(caught.value)
    assert "`km list`" in str(caught.value)


def test_resolve_refuses_to_guess_between_an_alias_and_a_number(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    named_two = store.insert(make_record("2"))
    numbered_two = store.insert(make_record("other"))
    with pytest.raises(StateError, match="ambiguous") as caught:
        store.resolve("2")
    assert named_two.sandbox_id in str(caught.value) and numbered_two.sandbox_id in str(caught.value)
    assert store.resolve("#2") == numbered_two
    assert store.resolve(named_two.sandbox_id) == named_two


def test_resolve_accepts_a_ref_that_names_one_sandbox_two_ways(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record("1"))
    assert store.resolve("1") == record


# --- update ------------------------------------------------------------------------------------


def test_update_changes_fields_and_bumps_updated_at(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record())
    before = datetime.now(UTC)
    updated = store.update(record.sandbox_id, status="running", resources={"address": "10.0.0.2"}, locked=True)
    assert (updated.status, updated.resources, updated.locked) == ("running", {"address": "10.0.0.2"}, True)
    assert updated.updated_at >= before > record.updated_at
    assert updated.created_at == record.created_at and updated.number == record.number
    assert store.get(record.sandbox_id) == updated


def test_update_moves_updated_at_forward_even_from_a_future_timestamp(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    future = datetime.now(UTC) + timedelta(days=1)
    record = store.insert(make_record(updated_at=future))
    assert store.update(record.sandbox_id).updated_at > future


def test_update_with_matching_expected_status(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record(status="running"))
    assert store.update(record.sandbox_id, expected_status="running", status="stopped").status == "stopped"


def test_update_with_stale_expected_status_changes_nothing(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record("goose", status="stopped"))
    with pytest.raises(StateError) as caught:
        store.update(record.sandbox_id, expected_status="running", status="paused")
    message = str(caught.value)
    assert record.sandbox_id in message and "'stopped'" in message and "'running'" in message and "km list" in message
    assert store.get(record.sandbox_id) == record


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"bogus": 1}, "unknown SandboxRecord field(s): bogus"),
        ({"status": "running", "colour": "red", "age": 3}, "unknown SandboxRecord field(s): age, colour"),
        ({"sandbox_id": "sb-00000000"}, "cannot change sandbox_id"),
        ({"number": 5}, "cannot change number"),
        ({"created_at": CREATED}, "cannot change created_at"),
        ({"updated_at": CREATED}, "cannot change updated_at"),
    ],
)
def test_update_refuses_unknown_and_store_owned_fields(
    store: SQLiteStateStore, make_record: MakeRecord, changes: dict[str, Any], complaint: str
) -> None:
    record = store.insert(make_record())
    with pytest.raises(TypeError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        store.update(record.sandbox_id, **changes)
    with pytest.raises(TypeError):
        store.update("sb-00000000", **changes)  # the call is wrong before any row is looked at
    assert store.get(record.sandbox_id) == record


def test_update_refuses_invalid_values(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    record = store.insert(make_record())
    with pytest.raises(ValidationError):
        store.update(record.sandbox_id, status="exploded")
    assert store.get(record.sandbox_id) == record


def test_update_unknown_sandbox(store: SQLiteStateStore) -> None:
    with pytest.raises(SandboxNotFound) as caught:
        store.update("sb-00000000", status="running")
    assert caught.value.ref == "sb-00000000"


def test_update_alias_keeps_aliases_unique(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    goose = store.insert(make_record("goose"))
    codex = store.insert(make_record("codex"))
    with pytest.raises(AliasTaken) as caught:
        store.update(codex.sandbox_id, alias="goose")
    assert caught.value.sandbox_id == goose.sandbox_id
    assert store.update(codex.sandbox_id, alias="gander").alias == "gander"
    assert store.find_by_alias("gander") == store.get(codex.sandbox_id)
    assert store.find_by_alias("codex") is None
    assert store.update(goose.sandbox_id, alias="goose").alias == "goose", "keeping one's own alias is not a clash"


# --- delete ------------------------------------------------------------------------------------


def test_delete_is_idempotent(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    kept = store.insert(make_record("kept"))
    gone = store.insert(make_record("gone"))
    store.delete(gone.sandbox_id)
    store.delete(gone.sandbox_id)
    store.delete("sb-00000000")
    with pytest.raises(SandboxNotFound):
        store.get(gone.sandbox_id)
    assert store.list() == [kept]


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


def test_one_store_object_can_be_used_from_another_thread(store: SQLiteStateStore, make_record: MakeRecord) -> None:
    """`km agent run --wait` touches the record from a keep-alive thread while the main thread waits."""
    record = store.insert(make_record())
    errors: list[BaseException] = []

    def touch() -> None:
        try:
            store.update(record.sandbox_id, resources={"last_active": "2026-11-27T00:00:00+00:00"})
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    thread = threading.Thread(target=touch)
    thread.start()
    thread.join(timeout=10)
    assert errors == []
    found = store.get(record.sandbox_id)
    assert found.resources["last_active"] == "2026-11-27T00:00:00+00:00"
