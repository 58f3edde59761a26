"""Sandbox records: UTC timestamps, the `km list --json` shape, and values the store could not handle refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from controller.state import SandboxRecord
from tests.unit.controller.state.conftest import CREATED, MakeRecord

CLI_KEYS = {"id", "alias", "profile", "substrate", "status", "created_at", "ttl_expiry"}


def test_as_json_has_the_cli_contract_keys(make_record: MakeRecord) -> None:
    record = make_record(ttl_expiry=CREATED + timedelta(hours=4), number=3)
    data = record.as_json()
    assert CLI_KEYS <= set(data)
    assert "sandbox_id" not in data
    assert data["id"] == record.sandbox_id
    assert data["created_at"] == "2025-05-01T12:00:00Z"
    assert data["ttl_expiry"] == "2025-05-01T16:00:00Z"
    assert data["number"] == 3


def test_as_json_keeps_microseconds_and_null_expiry(make_record: MakeRecord) -> None:
    data = make_record(updated_at=CREATED.replace(microsecond=250)).as_json()
    assert data["updated_at"] == "2025-05-01T12:00:00.000250Z"
    assert data["ttl_expiry"] is None


def test_timestamps_in_another_zone_are_kept_as_the_same_instant_in_utc(make_record: MakeRecord) -> None:
    plus_two = timezone(timedelta(hours=2))
    record = make_record(created_at=datetime(2025, 5, 1, 14, 0, tzinfo=plus_two))
    assert record.created_at == CREATED
    assert record.created_at.utcoffset() == timedelta(0)
    assert record.as_json()["created_at"] == "2025-05-01T12:00:00Z"


@pytest.mark.parametrize("field", ["created_at", "updated_at", "ttl_expiry"])
def test_naive_timestamps_are_refused(make_record: MakeRecord, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make_record(**{field: datetime(2025, 5, 1, 12, 0)})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alias", ""),
        ("alias", "#3"),
        ("alias", "two words"),
        ("status", "exploded"),
        ("substrate", "gcp"),
        ("teardown_policy", "explode"),
        ("idle_timeout_seconds", 0),
        ("number", 0),
        ("sandbox_id", ""),
        ("unknown_field", "x"),
    ],
)
def test_bad_values_are_refused(make_record: MakeRecord, field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        make_record(**{field: value})


def test_records_are_frozen(make_record: MakeRecord) -> None:
    record = make_record()
    with pytest.raises(ValidationError):
        record.status = "running"  # type: ignore[misc]


def test_json_round_trip(make_record: MakeRecord) -> None:
    record = make_record(
        ttl_expiry=datetime.now(UTC), resources={"machine": "/var/lib/machines/goose"}, locked=True, failure_reason="boom"
    )
    assert SandboxRecord.model_validate_json(record.model_dump_json()) == record
