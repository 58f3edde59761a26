"""Sandbox state: what km knows about each sandbox, in SQLite locally (DynamoDB behind the same interface)."""

from controller.state.errors import AliasTaken, SandboxNotFound, StateError
from controller.state.ids import new_sandbox_id
from controller.state.paths import default_state_path
from controller.state.records import SandboxRecord, SandboxStatus
from controller.state.sqlite import SQLiteStateStore
from controller.state.store import StateStore

__all__ = [
    "AliasTaken",
    "SQLiteStateStore",
    "SandboxNotFound",
    "SandboxRecord",
    "SandboxStatus",
    "StateError",
    "StateStore",
    "default_state_path",
    "new_sandbox_id",
]
