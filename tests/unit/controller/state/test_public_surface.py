"""controller.state exposes a short, sorted surface, and the SQLite store really is a `StateStore`."""

from __future__ import annotations

import inspect
from pathlib import Path

import controller.state
from controller.state import SQLiteStateStore, StateStore

PROTOCOL_METHODS = ["delete", "find_by_alias", "get", "insert", "list", "resolve", "update"]


def test_surface_is_sorted_and_complete() -> None:
    assert controller.state.__all__ == sorted(controller.state.__all__)
    assert set(controller.state.__all__) == {
        "AliasTaken",
        "SQLiteStateStore",
        "SandboxNotFound",
        "SandboxRecord",
        "SandboxStatus",
        "StateError",
        "StateStore",
        "default_state_path",
        "new_sandbox_id",
    }
    for name in controller.state.__all__:
        assert hasattr(controller.state, name)


def test_sqlite_store_is_a_state_store(tmp_path: Path) -> None:
    store: StateStore = SQLiteStateStore(tmp_path / "state.db")  # mypy checks the assignment
    assert isinstance(store, StateStore)


def test_protocol_lists_the_methods_the_brief_names() -> None:
    declared = sorted(name for name, value in vars(StateStore).items() if inspect.isfunction(value) and not name.startswith("_"))
    assert declared == PROTOCOL_METHODS


def test_sqlite_store_methods_have_the_protocol_signatures() -> None:
    # runtime_checkable only checks that the names exist; the signatures must match too.
    for name in PROTOCOL_METHODS:
        assert inspect.signature(getattr(SQLiteStateStore, name)) == inspect.signature(getattr(StateStore, name)), name
