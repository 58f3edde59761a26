"""The shared state store for the ec2 substrate: one DynamoDB table that every operator's `km` writes to.

Uniqueness that SQLite gets from indexes under one lock comes here from conditional writes. The table is
keyed by `pk` alone and holds three kinds of item:

- `sandbox#<id>`: the record, one attribute per field, plus `version`, bumped by every write;
- `alias#<alias>` and `number#<n>`: claims naming the `sandbox_id` that holds the alias or list number.

A record and its claims are written and deleted together in one transaction, each claim on the condition
that nobody holds it yet, so two operators can never both get an alias or a number. Updates are
read-modify-write guarded by `version` (optimistic concurrency), retried a few times when another writer
got in between, so no change is lost. Reads are strongly consistent.

boto3 is imported only when a store first talks to AWS, so importing this module keeps `km --help` fast.
"""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from controller.aws import clients
from controller.state.errors import AliasTaken, SandboxNotFound, StateError
from controller.state.records import SandboxRecord, SandboxStatus, parse_utc_text, utc_text
from controller.state.store import Reference, apply_changes, check_change_names, check_status, lowest_free_number

if TYPE_CHECKING:
    from controller.aws.config import OperatorConfig

KEY = "pk"
SANDBOX_PREFIX = "sandbox#"
ALIAS_PREFIX = "alias#"
NUMBER_PREFIX = "number#"
VERSION = "version"

# Each failed attempt means another writer succeeded, so these bound contention, not a flaky network
# (botocore's standard retry mode already covers throttling and 5xx).
INSERT_ATTEMPTS = 20
UPDATE_ATTEMPTS = 10
READ_ATTEMPTS = 5
TABLE_ACTIVE_TIMEOUT_SECONDS = 120.0
TABLE_POLL_SECONDS = 0.5

_TIMESTAMPS = frozenset({"created_at", "updated_at", "ttl_expiry"})
# A transaction whose items were fine but raced another transaction on one of them; safe to retry.
_CONFLICT = "TransactionConflict"
_CONDITION_FAILED = "ConditionalCheckFailed"
_NOT_FOUND = "ResourceNotFoundException"


class DynamoDBStateStore:
    """`StateStore` on a DynamoDB table shared by operators; safe across threads, processes and machines."""

    def __init__(self, table_name: str, region: str) -> None:
        self.table_name = table_name
        self.region = region
        self._dynamodb: Any = None

    def __repr__(self) -> str:
        return f"DynamoDBStateStore({self.table_name!r}, {self.region!r})"

    def insert(self, record: SandboxRecord, avoid_numbers: Collection[int] = ()) -> SandboxRecord:
        lost: set[int] = set(avoid_numbers)
        for attempt in range(INSERT_ATTEMPTS):
            number = lowest_free_number(self._numbers_taken() | lost)
            stored = record.model_copy(update={"number": number})
            reasons = self._transact(
                "insert",
                [
                    _put_new(self.table_name, _item(stored, version=1)),
                    _put_new(self.table_name, _claim(ALIAS_PREFIX, stored.alias, stored.sandbox_id), report_holder=True),
                    _put_new(self.table_name, _claim(NUMBER_PREFIX, number, stored.sandbox_id)),
                ],
            )
            if reasons is None:
                return stored
            id_reason, alias_reason, number_reason = reasons
            if alias_reason.failed:
                holder = alias_reason.holder or self._claim_holder(ALIAS_PREFIX, stored.alias)
                if holder is not None:
                    raise AliasTaken(stored.alias, holder)
                continue  # the holder was destroyed meanwhile: the alias is free again
            if id_reason.failed:
                raise StateError(
                    f"sandbox id {record.sandbox_id} is already in DynamoDB table {self.table_name}; create again for a fresh id"
                )
            if number_reason.failed:
                lost.add(number)  # another operator took it first; a read may not show that yet
            _back_off(attempt, reasons)
        raise StateError(
            f"could not give sandbox {record.sandbox_id} a list number in DynamoDB table {self.table_name}: "
            f"other km commands took each free number first, {INSERT_ATTEMPTS} times; retry"
        )

    def get(self, sandbox_id: str) -> SandboxRecord:
        found = self._read_sandbox(sandbox_id)
        if found is None:
            raise SandboxNotFound(sandbox_id)
        return found[0]

    def find_by_alias(self, alias: str) -> SandboxRecord | None:
        return self._follow_claim(ALIAS_PREFIX, alias)

    def resolve(self, ref: str) -> SandboxRecord:
        reference = Reference.parse(ref)
        name, number = reference.name, reference.number
        by_id = self._read_sandbox(name) if name is not None else None
        by_alias = self._follow_claim(ALIAS_PREFIX, name) if name is not None else None
        by_number = self._follow_claim(NUMBER_PREFIX, number) if number is not None else None
        return reference.choose(by_id[0] if by_id else None, by_alias, by_number)

    def list(self) -> builtins.list[SandboxRecord]:
        records = [self._record(item) for item in self._scan(SANDBOX_PREFIX)]
        return sorted(records, key=lambda record: record.number or 0)

    def update(self, sandbox_id: str, /, *, expected_status: SandboxStatus | None = None, **changes: object) -> SandboxRecord:
        check_change_names(changes)
        for attempt in range(UPDATE_ATTEMPTS):
            found = self._read_sandbox(sandbox_id)
            if found is None:
                raise SandboxNotFound(sandbox_id)
            current, version = found
            check_status(current, expected_status)
            updated = apply_changes(current, changes, datetime.now(UTC))
            write = _put_over(self.table_name, _item(updated, version=version + 1), version, expected_status)
            if updated.alias == current.alias:
                if self._put(write):
                    return updated
                continue  # another writer got in between: read again, and check the status again
            # Moving the alias: take the new claim and release the old one in the same transaction.
            reasons = self._transact(
                "update",
                [
                    {"Put": write},
                    _put_new(self.table_name, _claim(ALIAS_PREFIX, updated.alias, sandbox_id), report_holder=True),
                    _delete_claim(self.table_name, ALIAS_PREFIX, current.alias, sandbox_id),
                ],
            )
            if reasons is None:
                return updated
            alias_reason = reasons[1]
            if alias_reason.failed:
                holder = alias_reason.holder or self._claim_holder(ALIAS_PREFIX, updated.alias)
                if holder is not None and holder != sandbox_id:
                    raise AliasTaken(updated.alias, holder)
            _back_off(attempt, reasons)
        raise StateError(
            f"sandbox {sandbox_id} in DynamoDB table {self.table_name} was changed by other km commands "
            f"{UPDATE_ATTEMPTS} times while this one tried to update it; retry"
        )

    def delete(self, sandbox_id: str) -> None:
        for attempt in range(UPDATE_ATTEMPTS):
            found = self._read_sandbox(sandbox_id)
            if found is None:
                return
            current, version = found
            reasons = self._transact(
                "delete",
                [
                    {
                        "Delete": {
                            "TableName": self.table_name,
                            "Key": _key(SANDBOX_PREFIX, sandbox_id),
                            "ConditionExpression": "#version = :version",
                            "ExpressionAttributeNames": {"#version": VERSION},
                            "ExpressionAttributeValues": {":version": {"N": str(version)}},
                        }
                    },
                    _delete_claim(self.table_name, ALIAS_PREFIX, current.alias, sandbox_id),
                    _delete_claim(self.table_name, NUMBER_PREFIX, current.number, sandbox_id),
                ],
            )
            if reasons is None:
                return
            _back_off(attempt, reasons)  # changed or deleted meanwhile: look again
        raise StateError(
            f"sandbox {sandbox_id} in DynamoDB table {self.table_name} was changed by other km commands "
            f"{UPDATE_ATTEMPTS} times while this one tried to delete it; retry"
        )

    # --- reads -----------------------------------------------------------------------------------

    def _read_sandbox(self, sandbox_id: str) -> tuple[SandboxRecord, int] | None:
        """The record and its version, or None."""
        item = self._get_item(_key(SANDBOX_PREFIX, sandbox_id))
        return None if item is None else (self._record(item), int(item[VERSION]["N"]))

    def _claim_holder(self, prefix: str, value: str | int) -> str | None:
        item = self._get_item(_key(prefix, value))
        return None if item is None else str(item["sandbox_id"]["S"])

    def _follow_claim(self, prefix: str, value: str | int) -> SandboxRecord | None:
        """The sandbox holding an alias or number: the claim, then the record, checked against each other."""
        field = "alias" if prefix == ALIAS_PREFIX else "number"
        holder = None
        for _ in range(READ_ATTEMPTS):
            holder = self._claim_holder(prefix, value)
            if holder is None:
                return None
            found = self._read_sandbox(holder)
            if found is not None and getattr(found[0], field) == value:
                return found[0]
            # Renamed or destroyed between the two reads: look again.
        raise StateError(
            f"item {prefix}{value} in DynamoDB table {self.table_name} says sandbox {holder} holds {field} {value!r}, "
            "but that sandbox's record disagrees; retry, and if this persists delete that item"
        )

    def _numbers_taken(self) -> set[int]:
        return {int(item[KEY]["S"].removeprefix(NUMBER_PREFIX)) for item in self._scan(NUMBER_PREFIX, keys_only=True)}

    def _record(self, item: dict[str, Any]) -> SandboxRecord:
        try:
            return _record(item)
        except (KeyError, ValueError, ValidationError) as error:
            raise StateError(
                f"item {item.get(KEY, {}).get('S')!r} in DynamoDB table {self.table_name} is not a sandbox record "
                f"this km understands ({error}); upgrade km, or remove the item"
            ) from error

    # --- calls to DynamoDB -------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._dynamodb is None:
            self._dynamodb = clients.client("dynamodb", self.region)
        return self._dynamodb

    def _get_item(self, key: dict[str, Any]) -> dict[str, Any] | None:
        with self._aws_errors("GetItem"):
            response = self._client().get_item(TableName=self.table_name, Key=key, ConsistentRead=True)
        item: dict[str, Any] | None = response.get("Item")
        return item

    def _scan(self, prefix: str, keys_only: bool = False) -> Iterator[dict[str, Any]]:
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "ConsistentRead": True,
            "FilterExpression": "begins_with(#pk, :prefix)",
            "ExpressionAttributeNames": {"#pk": KEY},
            "ExpressionAttributeValues": {":prefix": {"S": prefix}},
        }
        if keys_only:
            request["ProjectionExpression"] = "#pk"
        while True:
            with self._aws_errors("Scan"):
                response = self._client().scan(**request)
            yield from response.get("Items", [])
            if "LastEvaluatedKey" not in response:
                return
            request["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def _put(self, request: dict[str, Any]) -> bool:
        """A conditional PutItem; False when its condition failed."""
        with self._aws_errors("PutItem", expected=_CONDITION_FAILED + "Exception") as failed:
            self._client().put_item(**request)
        return not failed

    def _transact(self, operation: str, items: Sequence[dict[str, Any]]) -> builtins.list[_Reason] | None:
        """TransactWriteItems; None once written, else why each item would not go (in the order given)."""
        operation = f"TransactWriteItems ({operation})"
        with self._aws_errors(operation, expected="TransactionCanceledException") as cancelled:
            self._client().transact_write_items(TransactItems=list(items))
        if not cancelled:
            return None
        reasons = [_Reason.parse(reason) for reason in cancelled[0].response.get("CancellationReasons", [])]
        unexpected = {reason.code for reason in reasons} - {"None", _CONDITION_FAILED, _CONFLICT}
        if len(reasons) != len(items) or unexpected:
            codes = ", ".join(reason.code for reason in reasons) or "no reason given"
            raise StateError(
                f"DynamoDB {operation} on table {self.table_name} in {self.region} was cancelled ({codes}); retry"
            ) from cancelled[0]
        return reasons

    def _aws_errors(self, operation: str, expected: str | None = None) -> AbstractContextManager[builtins.list[Any]]:
        return _dynamodb_errors(self.table_name, self.region, operation, expected)


@dataclass(frozen=True)
class _Reason:
    """Why one item of a cancelled transaction did not go: its code, and for a claim, who holds it."""

    code: str
    holder: str | None

    @classmethod
    def parse(cls, reason: dict[str, Any]) -> _Reason:
        holder = reason.get("Item", {}).get("sandbox_id", {}).get("S")
        return cls(str(reason.get("Code", "None")), holder)

    @property
    def failed(self) -> bool:
        return self.code == _CONDITION_FAILED


def _back_off(attempt: int, reasons: Iterable[_Reason]) -> None:
    """A short random pause after a transaction conflict, so two racing writers stop colliding."""
    if any(reason.code == _CONFLICT for reason in reasons):
        time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))


# --- items ---------------------------------------------------------------------------------------


def _key(prefix: str, value: str | int | None) -> dict[str, Any]:
    return {KEY: {"S": f"{prefix}{value}"}}


def _claim(prefix: str, value: str | int | None, sandbox_id: str) -> dict[str, Any]:
    return {**_key(prefix, value), "sandbox_id": {"S": sandbox_id}}


def _put_new(table_name: str, item: dict[str, Any], report_holder: bool = False) -> dict[str, Any]:
    """A transaction item writing `item` only if no item has its key."""
    put: dict[str, Any] = {"TableName": table_name, "Item": item, "ConditionExpression": "attribute_not_exists(#pk)"}
    put["ExpressionAttributeNames"] = {"#pk": KEY}
    if report_holder:
        put["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    return {"Put": put}


def _put_over(table_name: str, item: dict[str, Any], version: int, expected_status: SandboxStatus | None) -> dict[str, Any]:
    """A PutItem replacing a record only if it is still at `version` (and, when given, in `expected_status`)."""
    condition = "#version = :version"
    names = {"#version": VERSION}
    values: dict[str, Any] = {":version": {"N": str(version)}}
    if expected_status is not None:
        condition += " AND #status = :expected_status"
        names["#status"] = "status"
        values[":expected_status"] = {"S": expected_status}
    return {
        "TableName": table_name,
        "Item": item,
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def _delete_claim(table_name: str, prefix: str, value: str | int | None, sandbox_id: str) -> dict[str, Any]:
    """A transaction item releasing a claim this sandbox holds; one already gone is no obstacle."""
    return {
        "Delete": {
            "TableName": table_name,
            "Key": _key(prefix, value),
            "ConditionExpression": "attribute_not_exists(#pk) OR #sandbox_id = :sandbox_id",
            "ExpressionAttributeNames": {"#pk": KEY, "#sandbox_id": "sandbox_id"},
            "ExpressionAttributeValues": {":sandbox_id": {"S": sandbox_id}},
        }
    }


def _item(record: SandboxRecord, version: int) -> dict[str, Any]:
    """The record as DynamoDB attributes; fields that are None are left out."""
    item: dict[str, Any] = {**_key(SANDBOX_PREFIX, record.sandbox_id), VERSION: {"N": str(version)}}
    for name, value in record.model_dump().items():
        if value is None:
            continue
        if name in _TIMESTAMPS:
            item[name] = {"S": utc_text(value)}
        elif isinstance(value, bool):
            item[name] = {"BOOL": value}
        elif isinstance(value, int):
            item[name] = {"N": str(value)}
        elif isinstance(value, dict):
            item[name] = {"M": {key: {"S": text} for key, text in value.items()}}
        else:
            item[name] = {"S": value}
    return item


def _record(item: dict[str, Any]) -> SandboxRecord:
    data: dict[str, Any] = dict.fromkeys(SandboxRecord.model_fields)  # absent attributes are the fields set to None
    for name, attribute in item.items():
        if name in (KEY, VERSION):
            continue
        ((kind, value),) = attribute.items()
        if name in _TIMESTAMPS:
            data[name] = parse_utc_text(value)
        elif kind == "N":
            data[name] = int(value)
        elif kind == "M":
            data[name] = {key: text["S"] for key, text in value.items()}
        else:
            data[name] = value  # S and BOOL arrive as str and bool
    return SandboxRecord.model_validate(data)


# --- tables --------------------------------------------------------------------------------------


def table_names(config: OperatorConfig) -> list[str]:
    """The tables km needs, named by the operator's config: sandboxes (this store) and schedules (`km at`)."""
    return [config.table("sandboxes"), config.table("schedules")]


def missing_tables(config: OperatorConfig, region: str) -> list[str]:
    """The tables `ensure_tables` would create, creating nothing: the dry run of `km init`."""
    dynamodb = clients.client("dynamodb", region)
    return [name for name in table_names(config) if _table_status(dynamodb, name, region) is None]


def ensure_tables(config: OperatorConfig, region: str) -> list[str]:
    """Create the tables that are missing (on demand, a string `pk` as the only key), wait until all are ACTIVE,
    and return the names created.

    Idempotent, and safe when two operators run it at once: a table the other one created meanwhile is
    waited for, not reported as created here.
    """
    dynamodb = clients.client("dynamodb", region)
    created: list[str] = []
    for name in table_names(config):
        if _table_status(dynamodb, name, region) is not None:
            continue
        with _dynamodb_errors(name, region, "CreateTable", expected="ResourceInUseException") as raced:
            dynamodb.create_table(
                TableName=name,
                AttributeDefinitions=[{"AttributeName": KEY, "AttributeType": "S"}],
                KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        if not raced:
            created.append(name)
    for name in table_names(config):
        _wait_until_active(dynamodb, name, region)
    return created


def _wait_until_active(dynamodb: Any, table_name: str, region: str) -> None:
    deadline = time.monotonic() + TABLE_ACTIVE_TIMEOUT_SECONDS
    while (status := _table_status(dynamodb, table_name, region)) != "ACTIVE":
        if time.monotonic() > deadline:
            raise StateError(
                f"DynamoDB table {table_name} in {region} is still {status or 'missing'} after "
                f"{TABLE_ACTIVE_TIMEOUT_SECONDS:g} s; check it in the AWS console, then run `km init` again"
            )
        time.sleep(TABLE_POLL_SECONDS)


def _table_status(dynamodb: Any, table_name: str, region: str) -> str | None:
    """CREATING, ACTIVE, …; None when there is no such table."""
    with _dynamodb_errors(table_name, region, "DescribeTable", expected=_NOT_FOUND) as missing:
        response = dynamodb.describe_table(TableName=table_name)
    return None if missing else str(response["Table"]["TableStatus"])


@contextmanager
def _dynamodb_errors(table_name: str, region: str, operation: str, expected: str | None) -> Iterator[list[Any]]:
    """AWS failures as `StateError`s naming the table and the call; an error with the `expected` code is
    collected into the yielded list instead, for the caller to act on."""
    from botocore.exceptions import BotoCoreError, ClientError

    caught: list[Any] = []
    try:
        yield caught
    except ClientError as error:
        code = clients.error_code(error)
        if code is not None and code == expected:
            caught.append(error)
        elif code == _NOT_FOUND:
            raise StateError(f"DynamoDB table {table_name} not found in {region}: run `km init`") from error
        else:
            raise StateError(f"DynamoDB {operation} on table {table_name} in {region} failed: {error}") from error
    except BotoCoreError as error:
        raise StateError(
            f"DynamoDB {operation} on table {table_name} in {region} failed: {error}; "
            "check the network and AWS credentials, then retry"
        ) from error
