"""Sandbox state: what km knows about each sandbox, in SQLite locally and in DynamoDB for ec2, behind one interface."""

from controller.state.dynamodb import DynamoDBStateStore
from controller.state.errors import AliasTaken, SandboxNotFound, StateError
from controller.state.ids import new_sandbox_id
from controller.state.paths import default_state_path
from controller.state.records import SandboxRecord, SandboxStatus
from controller.state.sqlite import SQLiteStateStore
from controller.state.store import StateStore

__all__ = [
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
]
