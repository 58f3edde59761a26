"""The state store interface, and the rules every implementation shares.

SQLite (local, several `km` processes on one file) and DynamoDB (shared by operators) implement
`StateStore`; the pure helpers here keep them agreeing on how a reference resolves, how list numbers
are chosen and what an update may change.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from controller.state.errors import SandboxNotFound, StateError
from controller.state.records import SandboxRecord, SandboxStatus

# The store sets these; callers who could change them would break ids, list numbers or history.
STORE_OWNED_FIELDS = frozenset({"sandbox_id", "number", "created_at", "updated_at"})

_LIST_NUMBER = re.compile(r"#?([0-9]+)")


@runtime_checkable
class StateStore(Protocol):
    """Sandbox records keyed by id, with unique aliases and stable list numbers."""

    def insert(self, record: SandboxRecord, avoid_numbers: Collection[int] = ()) -> SandboxRecord:
        """Store a new sandbox and return it with its list `number` (the lowest free one not in
        `avoid_numbers`: those the other store uses, so `#N` names one sandbox); `AliasTaken` if the alias is in use."""
        ...

    def get(self, sandbox_id: str) -> SandboxRecord:
        """The sandbox with this id; `SandboxNotFound` if there is none."""
        ...

    def find_by_alias(self, alias: str) -> SandboxRecord | None:
        """The sandbox with this alias, if one exists."""
        ...

    def resolve(self, ref: str) -> SandboxRecord:
        """The sandbox an operator means by an id, an alias, or a list number (`3` or `#3`)."""
        ...

    def list(self) -> builtins.list[SandboxRecord]:
        """Every sandbox, ordered by list number."""
        ...

    def update(self, sandbox_id: str, /, *, expected_status: SandboxStatus | None = None, **changes: object) -> SandboxRecord:
        """Change fields and bump `updated_at`; with `expected_status`, only if the status is still that.

        `sandbox_id` is positional-only so that `sandbox_id=` among the changes is refused as a store-owned field.
        """
        ...

    def delete(self, sandbox_id: str) -> None:
        """Forget a sandbox; deleting one that is already gone is not an error."""
        ...


@dataclass(frozen=True)
class Reference:
    """How an operator's reference is looked up: `#3` only as a list number, `3` also as an id or alias."""

    text: str
    name: str | None
    number: int | None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        match = _LIST_NUMBER.fullmatch(ref)
        number = int(match.group(1)) if match and int(match.group(1)) > 0 else None
        return cls(ref, None if ref.startswith("#") else ref, number)

    @property
    def tried(self) -> tuple[str, ...]:
        ways: tuple[str, ...] = ("id", "alias") if self.name is not None else ()
        if self.number is not None or self.name is None:
            ways += ("list number",)
        return ways

    def choose(
        self, by_id: SandboxRecord | None, by_alias: SandboxRecord | None, by_number: SandboxRecord | None
    ) -> SandboxRecord:
        """The one sandbox the lookups found; two different ones is ambiguous and never guessed."""
        found = {"id": by_id, "alias": by_alias, "list number": by_number}
        matches = {way: record for way, record in found.items() if record is not None}
        distinct = {record.sandbox_id: record for record in matches.values()}
        if not distinct:
            raise SandboxNotFound(self.text, self.tried)
        if len(distinct) > 1:
            which = ", ".join(f"the {way} of {record.sandbox_id}" for way, record in matches.items())
            raise StateError(f"{self.text!r} is ambiguous: it is {which}; use the sandbox id, or '#N' for a list number")
        return next(iter(distinct.values()))


def lowest_free_number(taken: Iterable[int]) -> int:
    """The smallest positive integer not in `taken`: numbers stay short and a freed one is reused."""
    used = set(taken)
    number = 1
    while number in used:
        number += 1
    return number


def check_change_names(changes: Mapping[str, object]) -> None:
    """Refuse, as a call with a wrong keyword would, fields that do not exist or that the store owns."""
    unknown = sorted(set(changes) - set(SandboxRecord.model_fields))
    if unknown:
        raise TypeError(f"update() got unknown SandboxRecord field(s): {', '.join(unknown)}")
    owned = sorted(set(changes) & STORE_OWNED_FIELDS)
    if owned:
        raise TypeError(f"update() cannot change {', '.join(owned)}: the store sets them")


def check_status(record: SandboxRecord, expected_status: SandboxStatus | None) -> None:
    """The compare half of compare-and-set: another km process may have moved the sandbox on."""
    if expected_status is not None and record.status != expected_status:
        raise StateError(
            f"sandbox {record.sandbox_id} ({record.alias}) is {record.status!r}, not {expected_status!r}: "
            "another km command changed it meanwhile; run `km list` to see where it stands, then retry"
        )


def apply_changes(record: SandboxRecord, changes: Mapping[str, object], now: datetime) -> SandboxRecord:
    """The record with `changes` validated in and `updated_at` moved strictly forward, even on a coarse clock."""
    updated_at = max(now, record.updated_at + timedelta(microseconds=1))
    return SandboxRecord.model_validate({**record.model_dump(), **changes, "updated_at": updated_at})
