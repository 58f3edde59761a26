"""Fixtures for the state store tests: a real SQLite file in tmp_path, and records to put in it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.state import SandboxRecord, SQLiteStateStore, new_sandbox_id

MakeRecord = Callable[..., SandboxRecord]
CREATED = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A database path whose directory does not exist yet, as on a fresh machine."""
    return tmp_path / "km-state" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStateStore]:
    opened = SQLiteStateStore(db_path)
    yield opened
    opened.close()


@pytest.fixture
def other_store(db_path: Path) -> Iterator[SQLiteStateStore]:
    """A second store on the same file, as another km process would open it."""
    opened = SQLiteStateStore(db_path)
    yield opened
    opened.close()


def new_record(alias: str = "goose", **overrides: Any) -> SandboxRecord:
    """A minimal valid record (a fresh id each call); keyword arguments override any field."""
    fields: dict[str, Any] = {
        "sandbox_id": new_sandbox_id("sb"),
        "alias": alias,
        "profile": "goose",
        "profile_file": None,
        "substrate": "local",
        "region": "local",
        "status": "starting",
        "plan_hash": "sha256:plan",
        "runtime_hash": "sha256:runtime",
        "policy_hash": "sha256:policy",
        "created_at": CREATED,
        "updated_at": CREATED,
        "ttl_expiry": None,
        "idle_timeout_seconds": None,
        "teardown_policy": "destroy",
    }
    return SandboxRecord(**(fields | overrides))


@pytest.fixture
def make_record() -> MakeRecord:
    """`new_record`, for tests that take their record factory as a fixture."""
    return new_record
