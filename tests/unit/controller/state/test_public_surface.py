"""controller.state exposes a short, sorted surface, both stores really are `StateStore`s, and importing it
leaves boto3 unloaded."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import controller.state
from controller.state import DynamoDBStateStore, SQLiteStateStore, StateStore

PROTOCOL_METHODS = ["delete", "find_by_alias", "get", "insert", "list", "resolve", "update"]


def test_surface_is_sorted_and_complete() -> None:
    assert controller.state.__all__ == sorted(controller.state.__all__)
    assert set(controller.state.__all__) == {
        "AliasTaken",
        "DynamoDBStateStore",
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


def test_both_stores_are_state_stores(tmp_path: Path) -> None:
    stores: list[StateStore] = [SQLiteStateStore(tmp_path / "state.db"), DynamoDBStateStore("km-sandboxes", "us-east-1")]
    for store in stores:
        assert isinstance(store, StateStore)


def test_protocol_lists_the_methods_the_brief_names() -> None:
    declared = sorted(name for name, value in vars(StateStore).items() if inspect.isfunction(value) and not name.startswith("_"))
    assert declared == PROTOCOL_METHODS


@pytest.mark.parametrize("store_class", [SQLiteStateStore, DynamoDBStateStore])
def test_store_methods_have_the_protocol_signatures(store_class: type) -> None:
    # runtime_checkable only checks that the names exist; the signatures must match too.
    for name in PROTOCOL_METHODS:
        assert inspect.signature(getattr(store_class, name)) == inspect.signature(getattr(StateStore, name)), name


def test_importing_the_state_package_does_not_load_boto3() -> None:
    """`km --help` and `km list` on the local substrate must not pay for boto3's import."""
    code = "import sys, controller.state; print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
