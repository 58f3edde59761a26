"""The local state store: one SQLite file shared by every `km` and `doit` process on the machine.

Writers take the database lock up front (`BEGIN IMMEDIATE`), so check-then-write steps such as "is this
alias free, which number is lowest" are atomic across processes; WAL mode lets `km list` read while
another process writes. A store opens its connection lazily, once per process, because SQLite forbids
using a connection on both sides of a `fork`.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.state.errors import AliasTaken, SandboxNotFound, StateError
from controller.state.records import SandboxRecord, SandboxStatus, parse_utc_text, utc_text
from controller.state.store import Reference, apply_changes, check_change_names, check_status, lowest_free_number

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 10.0

_COLUMNS = tuple(SandboxRecord.model_fields)
_TIMESTAMPS = ("created_at", "updated_at", "ttl_expiry")
_SCHEMA = (
    """
    CREATE TABLE sandboxes (
        sandbox_id TEXT PRIMARY KEY,
        alias TEXT NOT NULL,
        profile TEXT NOT NULL,
        profile_file TEXT,
        substrate TEXT NOT NULL,
        region TEXT NOT NULL,
        status TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        runtime_hash TEXT NOT NULL,
        policy_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        ttl_expiry TEXT,
        idle_timeout_seconds INTEGER,
        teardown_policy TEXT NOT NULL,
        locked INTEGER NOT NULL,
        failure_reason TEXT,
        resources TEXT NOT NULL,
        number INTEGER NOT NULL CHECK (number > 0)
    )
    """,
    "CREATE UNIQUE INDEX sandboxes_alias ON sandboxes (alias)",
    "CREATE UNIQUE INDEX sandboxes_number ON sandboxes (number)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = f"INSERT INTO sandboxes ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + name for name in _COLUMNS)})"
_UPDATE = f"UPDATE sandboxes SET {', '.join(f'{name} = :{name}' for name in _COLUMNS)} WHERE sandbox_id = :sandbox_id"


class SQLiteStateStore:
    """`StateStore` on a SQLite file; safe for many processes at once, and for threads (one connection each)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()  # sqlite3 connections must stay in the thread that opened them
        # Connections opened before a fork belong to the parent: kept referenced so the child never closes them.
        self._inherited: builtins.list[sqlite3.Connection] = []

    def __repr__(self) -> str:
        return f"SQLiteStateStore({str(self.path)!r})"

    def insert(self, record: SandboxRecord, avoid_numbers: Collection[int] = ()) -> SandboxRecord:
        with self._write() as connection:
            holder = connection.execute("SELECT sandbox_id FROM sandboxes WHERE alias = ?", (record.alias,)).fetchone()
            if holder is not None:
                raise AliasTaken(record.alias, holder["sandbox_id"])
            if connection.execute("SELECT 1 FROM sandboxes WHERE sandbox_id = ?", (record.sandbox_id,)).fetchone():
                raise StateError(f"sandbox id {record.sandbox_id} is already in {self.path}; create again for a fresh id")
            taken = (row["number"] for row in connection.execute("SELECT number FROM sandboxes"))
            stored = record.model_copy(update={"number": lowest_free_number([*taken, *avoid_numbers])})
            connection.execute(_INSERT, _row(stored))
        return stored

    def get(self, sandbox_id: str) -> SandboxRecord:
        with self._read() as connection:
            record = _select_one(connection, "sandbox_id", sandbox_id)
        if record is None:
            raise SandboxNotFound(sandbox_id)
        return record

    def find_by_alias(self, alias: str) -> SandboxRecord | None:
        with self._read() as connection:
            return _select_one(connection, "alias", alias)

    def resolve(self, ref: str) -> SandboxRecord:
        reference = Reference.parse(ref)
        with self._read() as connection:
            by_id = _select_one(connection, "sandbox_id", reference.name) if reference.name is not None else None
            by_alias = _select_one(connection, "alias", reference.name) if reference.name is not None else None
            by_number = _select_one(connection, "number", reference.number) if reference.number is not None else None
        return reference.choose(by_id, by_alias, by_number)

    def list(self) -> builtins.list[SandboxRecord]:
        with self._read() as connection:
            return [_record(row) for row in connection.execute("SELECT * FROM sandboxes ORDER BY number")]

    def update(self, sandbox_id: str, /, *, expected_status: SandboxStatus | None = None, **changes: object) -> SandboxRecord:
        check_change_names(changes)
        with self._write() as connection:
            current = _select_one(connection, "sandbox_id", sandbox_id)
            if current is None:
                raise SandboxNotFound(sandbox_id)
            check_status(current, expected_status)
            updated = apply_changes(current, changes, datetime.now(UTC))
            holder = _select_one(connection, "alias", updated.alias)
            if holder is not None and holder.sandbox_id != sandbox_id:
                raise AliasTaken(updated.alias, holder.sandbox_id)
            connection.execute(_UPDATE, _row(updated))
        return updated

    def delete(self, sandbox_id: str) -> None:
        with self._write() as connection:
            connection.execute("DELETE FROM sandboxes WHERE sandbox_id = ?", (sandbox_id,))

    def close(self) -> None:
        """Close this thread's connection; the store reopens one if used again."""
        current: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if current is not None and getattr(self._local, "pid", None) == os.getpid():
            current.close()
        self._local.connection = None
        self._local.pid = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the write lock from its first statement, so reads in it cannot go stale."""
        with self._transaction("BEGIN IMMEDIATE") as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every lookup in it sees the same snapshot."""
        with self._transaction("BEGIN") as connection:
            yield connection

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._database_errors():
            connection = self._connect()
            connection.execute(begin)
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
            connection.commit()

    def _connect(self) -> sqlite3.Connection:
        current: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if current is not None and getattr(self._local, "pid", None) == os.getpid():
            return current
        if current is not None:
            self._inherited.append(current)
        connection = self._open()
        self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def _open(self) -> sqlite3.Connection:
        _create_private_file(self.path)
        # isolation_level=None: the store issues BEGIN itself, so the sqlite3 module never opens one behind its back.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            _pragma(connection, f"busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self._use_wal(connection)
            self._ensure_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """Switch a new file to WAL (the mode is stored in the file, so later opens find it set)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while (mode := _pragma(connection, "journal_mode")) != "wal":
            try:
                mode = _pragma(connection, "journal_mode = WAL")
            except sqlite3.OperationalError as error:
                # The switch upgrades the pragma's own read lock to a write lock, which SQLite refuses at once
                # instead of waiting (waiting could deadlock), so busy_timeout does not cover processes racing here.
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
                continue
            if mode != "wal":
                raise StateError(f"{self.path} cannot use WAL mode (got {mode!r}); keep KM_STATE_DIR on a local filesystem")

    def _ensure_schema(self, connection: sqlite3.Connection) -> None:
        # The usual case needs no write lock, so `km list` never queues behind a busy writer just to open.
        if _pragma(connection, "user_version") == SCHEMA_VERSION:
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = _pragma(connection, "user_version")
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has state schema version {version}, newer than this km understands ({SCHEMA_VERSION}); "
                    "upgrade km, or point KM_STATE_DIR elsewhere"
                )
            if version == 0:
                for statement in _SCHEMA:
                    connection.execute(statement)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """SQLite failures the operator can act on, as `StateError`s that name the file."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # a bug in the checks above, not an operator problem: keep the traceback
        except sqlite3.DatabaseError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise StateError(
                    f"{self.path} stayed locked by another km process for {BUSY_TIMEOUT_SECONDS:g} s; "
                    f"retry, or find the stuck process with `fuser {self.path}`"
                ) from error
            raise StateError(f"state database {self.path} is unusable ({error}); move it aside and retry") from error


def _create_private_file(path: Path) -> None:
    """The directory (0700) and the database file (0600), created before SQLite would make them with the umask."""
    try:
        path.parent.mkdir(mode=0o700, parents=True)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


def _pragma(connection: sqlite3.Connection, pragma: str) -> Any:
    """A pragma's value, read to the end so no statement keeps a read lock open afterwards."""
    rows = connection.execute(f"PRAGMA {pragma}").fetchall()
    return rows[0][0] if rows else None


def _select_one(connection: sqlite3.Connection, column: str, value: str | int) -> SandboxRecord | None:
    row = connection.execute(f"SELECT * FROM sandboxes WHERE {column} = ?", (value,)).fetchone()
    return None if row is None else _record(row)


def _row(record: SandboxRecord) -> dict[str, Any]:
    row = record.model_dump()
    for name in _TIMESTAMPS:
        row[name] = None if row[name] is None else utc_text(row[name])
    row["locked"] = int(record.locked)
    row["resources"] = json.dumps(record.resources, sort_keys=True)
    return row


def _record(row: sqlite3.Row) -> SandboxRecord:
    data = dict(zip(row.keys(), row, strict=True))
    for name in _TIMESTAMPS:
        data[name] = None if data[name] is None else parse_utc_text(data[name])
    data["locked"] = bool(data["locked"])
    data["resources"] = json.loads(data["resources"])
    return SandboxRecord.model_validate(data)
