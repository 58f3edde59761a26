"""What every `StateStore` promises, written once and run against each implementation.

A test module subclasses `StateStoreContract` (the name does not start with `Test`, so it is collected
only through a subclass) and provides three fixtures: `store`, `other_store` (a second store object on
the same storage, as another km process or operator would open it) and `make_record`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from controller.state import AliasTaken, SandboxNotFound, SandboxRecord, StateError, StateStore
from tests.unit.controller.state.conftest import CREATED, MakeRecord

THREADS = 8
Attempt = Callable[[], str]


def race(attempts: list[Attempt]) -> list[str]:
    """Run each attempt in its own thread, all released at once; their reports, in no particular order."""
    barrier = threading.Barrier(len(attempts))
    reports: list[str] = []
    lock = threading.Lock()

    def run(attempt: Attempt) -> None:
        barrier.wait(timeout=30)
        try:
            report = attempt()
        except AliasTaken as error:
            report = f"taken by {error.sandbox_id}"
        except StateError as error:
            report = f"state error: {error}"
        except Exception as error:  # reported, so the test shows it rather than a missing report
            report = f"unexpected: {error!r}"
        with lock:
            reports.append(report)

    threads = [threading.Thread(target=run, args=(attempt,)) for attempt in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a racing thread hung"
    assert len(reports) == len(attempts), reports
    return reports


class StateStoreContract:
    """The behaviour SQLite and DynamoDB share: round trips, list numbers, references, updates, deletes, races."""

    # --- round trips ---------------------------------------------------------------------------

    def test_every_field_round_trips(self, store: StateStore, other_store: StateStore, make_record: MakeRecord) -> None:
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
        for reading in (store.get(record.sandbox_id), other_store.get(record.sandbox_id), other_store.list()[0]):
            assert reading == stored
            assert reading.created_at.tzinfo is not None and reading.created_at.utcoffset() == timedelta(0)
            assert reading.created_at == datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

    def test_optional_fields_round_trip_as_none(self, store: StateStore, make_record: MakeRecord) -> None:
        stored = store.insert(make_record(profile_file=None, ttl_expiry=None, idle_timeout_seconds=None, failure_reason=None))
        assert store.get(stored.sandbox_id) == stored
        assert stored.resources == {} and stored.locked is False

    # --- list numbers --------------------------------------------------------------------------

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
        self, store: StateStore, make_record: MakeRecord, steps: list[str], expected: dict[str, int]
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

    def test_a_number_stays_taken_until_its_row_is_deleted(self, store: StateStore, make_record: MakeRecord) -> None:
        first = store.insert(make_record("a"))
        store.insert(make_record("b"))
        store.update(first.sandbox_id, status="destroying")
        assert store.insert(make_record("c")).number == 3
        store.delete(first.sandbox_id)
        assert store.insert(make_record("d")).number == 1

    def test_a_number_given_by_the_caller_is_replaced(self, store: StateStore, make_record: MakeRecord) -> None:
        assert store.insert(make_record(number=7)).number == 1

    def test_numbers_the_other_store_uses_are_skipped(self, store: StateStore, make_record: MakeRecord) -> None:
        assert store.insert(make_record("a"), avoid_numbers=[2, 3]).number == 1
        assert store.insert(make_record("b"), avoid_numbers=[2, 3]).number == 4
        assert store.insert(make_record("c")).number == 2

    # --- aliases and ids -----------------------------------------------------------------------

    def test_alias_taken(self, store: StateStore, make_record: MakeRecord) -> None:
        holder = store.insert(make_record("goose"))
        with pytest.raises(AliasTaken) as caught:
            store.insert(make_record("goose"))
        assert (caught.value.alias, caught.value.sandbox_id) == ("goose", holder.sandbox_id)
        assert "'goose'" in str(caught.value) and holder.sandbox_id in str(caught.value) and "--alias" in str(caught.value)
        assert store.list() == [holder]
        assert store.insert(make_record("other")).number == 2, "a refused insert must not use up a number"

    def test_alias_is_free_again_after_delete(self, store: StateStore, make_record: MakeRecord) -> None:
        store.delete(store.insert(make_record("goose")).sandbox_id)
        assert store.insert(make_record("goose")).alias == "goose"

    def test_duplicate_id_is_refused(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("a"))
        with pytest.raises(StateError, match=record.sandbox_id):
            store.insert(make_record("b", sandbox_id=record.sandbox_id))
        assert len(store.list()) == 1
        assert store.find_by_alias("b") is None, "a refused insert must not keep its alias"
        assert store.insert(make_record("c")).number == 2, "a refused insert must not use up a number"

    def test_a_duplicate_id_with_a_taken_alias_is_an_alias_clash(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("a"))
        with pytest.raises(AliasTaken):
            store.insert(make_record("a", sandbox_id=record.sandbox_id))

    def test_find_by_alias(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("goose"))
        assert store.find_by_alias("goose") == record
        assert store.find_by_alias("gander") is None

    def test_get_unknown_id(self, store: StateStore) -> None:
        with pytest.raises(SandboxNotFound) as caught:
            store.get("sb-00000000")
        assert caught.value.ref == "sb-00000000"
        assert "sb-00000000" in str(caught.value) and "km list" in str(caught.value)

    # --- resolve -------------------------------------------------------------------------------

    @pytest.fixture
    def three(self, store: StateStore, make_record: MakeRecord) -> list[SandboxRecord]:
        """Three sandboxes numbered 1..3: aliases goose, codex, claude."""
        return [store.insert(make_record(alias)) for alias in ("goose", "codex", "claude")]

    @pytest.mark.parametrize(("ref", "index"), [("goose", 0), ("claude", 2), ("1", 0), ("#1", 0), ("3", 2), ("#2", 1)])
    def test_resolve_by_alias_or_number(self, store: StateStore, three: list[SandboxRecord], ref: str, index: int) -> None:
        assert store.resolve(ref) == three[index]

    def test_resolve_by_id(self, store: StateStore, three: list[SandboxRecord]) -> None:
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
    def test_resolve_unknown_says_what_was_tried(
        self, store: StateStore, three: list[SandboxRecord], ref: str, tried: str
    ) -> None:
        with pytest.raises(SandboxNotFound) as caught:
            store.resolve(ref)
        assert caught.value.ref == ref
        assert f"{ref!r} {tried}" in str(caught.value)
        assert "`km list`" in str(caught.value)

    def test_resolve_refuses_to_guess_between_an_alias_and_a_number(self, store: StateStore, make_record: MakeRecord) -> None:
        named_two = store.insert(make_record("2"))
        numbered_two = store.insert(make_record("other"))
        with pytest.raises(StateError, match="ambiguous") as caught:
            store.resolve("2")
        assert named_two.sandbox_id in str(caught.value) and numbered_two.sandbox_id in str(caught.value)
        assert store.resolve("#2") == numbered_two
        assert store.resolve(named_two.sandbox_id) == named_two

    def test_resolve_accepts_a_ref_that_names_one_sandbox_two_ways(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("1"))
        assert store.resolve("1") == record

    # --- update --------------------------------------------------------------------------------

    def test_update_changes_fields_and_bumps_updated_at(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record())
        before = datetime.now(UTC)
        updated = store.update(record.sandbox_id, status="running", resources={"address": "10.0.0.2"}, locked=True)
        assert (updated.status, updated.resources, updated.locked) == ("running", {"address": "10.0.0.2"}, True)
        assert updated.updated_at >= before > record.updated_at
        assert updated.created_at == record.created_at and updated.number == record.number
        assert store.get(record.sandbox_id) == updated

    def test_update_can_clear_optional_fields(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record(failure_reason="boom", ttl_expiry=CREATED, idle_timeout_seconds=60, profile_file="/p"))
        updated = store.update(
            record.sandbox_id, failure_reason=None, ttl_expiry=None, idle_timeout_seconds=None, profile_file=None
        )
        assert store.get(record.sandbox_id) == updated
        assert (updated.failure_reason, updated.ttl_expiry, updated.idle_timeout_seconds, updated.profile_file) == (None,) * 4

    def test_update_moves_updated_at_forward_even_from_a_future_timestamp(
        self, store: StateStore, make_record: MakeRecord
    ) -> None:
        future = datetime.now(UTC) + timedelta(days=1)
        record = store.insert(make_record(updated_at=future))
        assert store.update(record.sandbox_id).updated_at > future

    def test_update_with_matching_expected_status(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record(status="running"))
        assert store.update(record.sandbox_id, expected_status="running", status="stopped").status == "stopped"

    def test_update_with_stale_expected_status_changes_nothing(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("goose", status="stopped"))
        with pytest.raises(StateError) as caught:
            store.update(record.sandbox_id, expected_status="running", status="paused")
        message = str(caught.value)
        assert record.sandbox_id in message and "'stopped'" in message and "'running'" in message and "km list" in message
        assert store.get(record.sandbox_id) == record

    def test_a_stale_expected_status_is_refused_when_another_store_moved_the_sandbox(
        self, store: StateStore, other_store: StateStore, make_record: MakeRecord
    ) -> None:
        record = store.insert(make_record(status="running"))
        other_store.update(record.sandbox_id, expected_status="running", status="stopped")
        with pytest.raises(StateError, match="is 'stopped', not 'running'"):
            store.update(record.sandbox_id, expected_status="running", status="paused")
        assert store.get(record.sandbox_id).status == "stopped"

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
        self, store: StateStore, make_record: MakeRecord, changes: dict[str, Any], complaint: str
    ) -> None:
        record = store.insert(make_record())
        with pytest.raises(TypeError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
            store.update(record.sandbox_id, **changes)
        with pytest.raises(TypeError):
            store.update("sb-00000000", **changes)  # the call is wrong before any row is looked at
        assert store.get(record.sandbox_id) == record

    def test_update_refuses_invalid_values(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record())
        with pytest.raises(ValidationError):
            store.update(record.sandbox_id, status="exploded")
        assert store.get(record.sandbox_id) == record

    def test_update_unknown_sandbox(self, store: StateStore) -> None:
        with pytest.raises(SandboxNotFound) as caught:
            store.update("sb-00000000", status="running")
        assert caught.value.ref == "sb-00000000"

    def test_update_alias_keeps_aliases_unique(self, store: StateStore, make_record: MakeRecord) -> None:
        goose = store.insert(make_record("goose"))
        codex = store.insert(make_record("codex"))
        with pytest.raises(AliasTaken) as caught:
            store.update(codex.sandbox_id, alias="goose")
        assert caught.value.sandbox_id == goose.sandbox_id
        assert store.update(codex.sandbox_id, alias="gander").alias == "gander"
        assert store.find_by_alias("gander") == store.get(codex.sandbox_id)
        assert store.find_by_alias("codex") is None
        assert store.update(goose.sandbox_id, alias="goose").alias == "goose", "keeping one's own alias is not a clash"

    def test_a_released_alias_can_be_taken_and_a_refused_rename_changes_nothing(
        self, store: StateStore, make_record: MakeRecord
    ) -> None:
        goose = store.insert(make_record("goose"))
        codex = store.insert(make_record("codex"))
        with pytest.raises(AliasTaken):
            store.update(codex.sandbox_id, alias="goose", status="running")
        assert store.get(codex.sandbox_id) == codex and store.find_by_alias("codex") == codex
        store.update(goose.sandbox_id, alias="gander")
        assert store.insert(make_record("goose")).number == 3
        assert store.resolve("goose").sandbox_id != goose.sandbox_id

    # --- delete --------------------------------------------------------------------------------

    def test_delete_is_idempotent(self, store: StateStore, make_record: MakeRecord) -> None:
        kept = store.insert(make_record("kept"))
        gone = store.insert(make_record("gone"))
        store.delete(gone.sandbox_id)
        store.delete(gone.sandbox_id)
        store.delete("sb-00000000")
        with pytest.raises(SandboxNotFound):
            store.get(gone.sandbox_id)
        assert store.list() == [kept]

    def test_delete_after_a_rename_frees_the_new_alias_and_the_number(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("goose"))
        store.update(record.sandbox_id, alias="gander")
        store.delete(record.sandbox_id)
        assert store.find_by_alias("gander") is None and store.list() == []
        again = store.insert(make_record("gander"))
        assert (again.alias, again.number) == ("gander", 1)

    # --- threads and races ---------------------------------------------------------------------

    def test_one_store_object_can_be_used_from_another_thread(self, store: StateStore, make_record: MakeRecord) -> None:
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

    def test_racing_for_one_alias_leaves_one_sandbox(self, store: StateStore, make_record: MakeRecord) -> None:
        records = [make_record("goose") for _ in range(THREADS)]

        def insert(record: SandboxRecord) -> Attempt:
            return lambda: f"inserted {store.insert(record).sandbox_id}"

        reports = race([insert(record) for record in records])
        winners = [report.removeprefix("inserted ") for report in reports if report.startswith("inserted ")]
        assert len(winners) == 1, reports
        assert Counter(reports)[f"taken by {winners[0]}"] == THREADS - 1, reports
        assert [(record.sandbox_id, record.number) for record in store.list()] == [(winners[0], 1)]

    def test_racing_with_distinct_aliases_gives_distinct_numbers(self, store: StateStore, make_record: MakeRecord) -> None:
        records = [make_record(f"sandbox{index}") for index in range(THREADS)]

        def insert(record: SandboxRecord) -> Attempt:
            return lambda: str(store.insert(record).number)

        reports = race([insert(record) for record in records])
        assert sorted(reports, key=lambda report: int(report) if report.isdigit() else 0) == [
            str(n) for n in range(1, THREADS + 1)
        ], reports
        listed = store.list()
        assert [record.number for record in listed] == list(range(1, THREADS + 1))
        assert {record.sandbox_id for record in listed} == {record.sandbox_id for record in records}

    def test_racing_for_one_alias_by_insert_and_by_rename_leaves_one_holder(
        self, store: StateStore, make_record: MakeRecord
    ) -> None:
        renamed = [store.insert(make_record(f"old{index}")) for index in range(THREADS // 2)]
        inserted = [make_record("gander") for _ in range(THREADS // 2)]

        def rename(record: SandboxRecord) -> Attempt:
            return lambda: f"won by {store.update(record.sandbox_id, alias='gander').sandbox_id}"

        def insert(record: SandboxRecord) -> Attempt:
            return lambda: f"won by {store.insert(record).sandbox_id}"

        reports = race([rename(record) for record in renamed] + [insert(record) for record in inserted])
        winners = [report.removeprefix("won by ") for report in reports if report.startswith("won by ")]
        assert len(winners) == 1, reports
        assert Counter(reports)[f"taken by {winners[0]}"] == THREADS - 1, reports
        holder = store.find_by_alias("gander")
        assert holder is not None and holder.sandbox_id == winners[0]
        aliases = sorted(record.alias for record in store.list())
        assert aliases.count("gander") == 1 and len(aliases) == len(set(aliases))

    def test_compare_and_set_lets_exactly_one_thread_through(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record(status="running"))

        def stop() -> Attempt:
            return lambda: store.update(record.sandbox_id, expected_status="running", status="stopped").status

        reports = race([stop() for _ in range(THREADS)])
        assert reports.count("stopped") == 1, reports
        assert sum("is 'stopped', not 'running'" in report for report in reports) == THREADS - 1, reports
        assert store.get(record.sandbox_id).status == "stopped"

    def test_concurrent_updates_of_different_fields_all_stick(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record())
        changes: list[dict[str, Any]] = [
            {"status": "running"},
            {"locked": True},
            {"failure_reason": "none yet"},
            {"profile_file": "/profiles/goose.yaml"},
            {"ttl_expiry": CREATED + timedelta(hours=8)},
            {"idle_timeout_seconds": 600},
            {"teardown_policy": "retain"},
            {"resources": {"instance_id": "i-0abc"}},
        ]
        assert len(changes) == THREADS

        def change(fields: dict[str, Any]) -> Attempt:
            return lambda: str(store.update(record.sandbox_id, **fields).updated_at)

        reports = race([change(fields) for fields in changes])
        assert len(set(reports)) == THREADS, reports  # every write moved updated_at to a time of its own
        final = store.get(record.sandbox_id)
        for fields in changes:
            assert final.model_dump(include=set(fields)) == fields, final
        assert str(final.updated_at) == max(reports, key=lambda text: datetime.fromisoformat(text))

    def test_deleting_while_others_update_leaves_nothing_behind(self, store: StateStore, make_record: MakeRecord) -> None:
        record = store.insert(make_record("goose"))

        def touch(index: int) -> Attempt:
            return lambda: store.update(record.sandbox_id, resources={"touch": str(index)}).resources["touch"]

        def delete() -> str:
            store.delete(record.sandbox_id)
            return "deleted"

        reports = race([touch(index) for index in range(THREADS - 1)] + [delete])
        assert "deleted" in reports
        assert all(report in ("deleted", *map(str, range(THREADS))) or "no sandbox matches" in report for report in reports), (
            reports
        )
        assert store.list() == [] and store.find_by_alias("goose") is None
        assert store.insert(make_record("goose")).number == 1
