"""The DynamoDB state store on a moto server: the shared store contract, then what is DynamoDB's own (the item
layout, claims that always match the records, AWS errors, retries after conflicts, and the tables)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from controller.aws import clients
from controller.aws.config import OperatorConfig
from controller.state import DynamoDBStateStore, SandboxNotFound, StateError
from controller.state import dynamodb as dynamodb_store
from controller.state.dynamodb import ensure_tables, missing_tables
from tests.aws.conftest import REGION, Moto, free_port
from tests.unit.controller.state.conftest import CREATED, MakeRecord, new_record
from tests.unit.controller.state.contract import StateStoreContract

TABLE = "km-sandboxes"


class OneRequestAtATime:
    """WSGI middleware that lets moto handle one request at a time.

    Real DynamoDB applies each conditional write and each transaction atomically. moto does not when requests
    arrive together: it checks a condition, then writes, with no lock between, and undoes a cancelled
    transaction by restoring a copy of the whole table taken when it began, wiping other requests' writes
    made meanwhile. Racing stores against it lose claims or share a number even when they are right.
    Serialising requests restores the atomicity the store relies on; the stores' own reads and writes still
    interleave freely between requests, which is where their races are.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            response = self.app(environ, start_response)
            try:
                return list(response)
            finally:
                if hasattr(response, "close"):
                    response.close()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """Overrides conftest's server for this module with one whose requests are atomic, as in DynamoDB."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = free_port()
    app = OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def tables(moto: Moto) -> list[str]:
    return ensure_tables(OperatorConfig(), REGION)


@pytest.fixture
def store(tables: list[str]) -> DynamoDBStateStore:
    return DynamoDBStateStore(TABLE, REGION)


@pytest.fixture
def other_store(tables: list[str]) -> DynamoDBStateStore:
    """A second store on the same table, as another operator's km would open it."""
    return DynamoDBStateStore(TABLE, REGION)


@pytest.fixture
def make_record() -> MakeRecord:
    return new_record


def raw_items(moto: Moto, table: str = TABLE) -> dict[str, dict[str, Any]]:
    """Every item in the table as DynamoDB holds it, by `pk`."""
    items = moto.client("dynamodb").get_paginator("scan").paginate(TableName=table, ConsistentRead=True)
    return {item["pk"]["S"]: item for page in items for item in page["Items"]}


def assert_claims_match_records(moto: Moto) -> None:
    """Each record holds exactly one alias claim and one number claim, and no claim is left over."""
    items = raw_items(moto)
    records = {key: item for key, item in items.items() if key.startswith("sandbox#")}
    expected = {}
    for item in records.values():
        holder = {"S": item["sandbox_id"]["S"]}
        expected[f"alias#{item['alias']['S']}"] = holder
        expected[f"number#{item['number']['N']}"] = holder
    claims = {key: item["sandbox_id"] for key, item in items.items() if not key.startswith("sandbox#")}
    assert claims == expected
    assert len(expected) == 2 * len(records), "two records share an alias or a number"


class TestDynamoDBStateStore(StateStoreContract):
    """The shared contract; after every test, the claims in the table must still match the records."""

    @pytest.fixture(autouse=True)
    def _claims_stay_consistent(self, moto: Moto, tables: list[str]) -> Iterator[None]:
        yield
        assert_claims_match_records(moto)


# --- the items ---------------------------------------------------------------------------------


def test_item_layout(store: DynamoDBStateStore, moto: Moto, make_record: MakeRecord) -> None:
    record = store.insert(make_record("goose", ttl_expiry=CREATED + timedelta(hours=4), resources={"netns": "km-goose"}))
    items = raw_items(moto)
    assert set(items) == {f"sandbox#{record.sandbox_id}", "alias#goose", "number#1"}
    assert items["alias#goose"] == {"pk": {"S": "alias#goose"}, "sandbox_id": {"S": record.sandbox_id}}
    assert items["number#1"] == {"pk": {"S": "number#1"}, "sandbox_id": {"S": record.sandbox_id}}
    sandbox = items[f"sandbox#{record.sandbox_id}"]
    assert sandbox["created_at"] == {"S": "2025-05-01T12:00:00Z"} and sandbox["ttl_expiry"] == {"S": "2025-05-01T16:00:00Z"}
    assert sandbox["resources"] == {"M": {"netns": {"S": "km-goose"}}}
    assert (sandbox["number"], sandbox["locked"], sandbox["version"]) == ({"N": "1"}, {"BOOL": False}, {"N": "1"})
    assert "profile_file" not in sandbox and "failure_reason" not in sandbox, "None is stored as no attribute"


def test_every_write_bumps_the_version_and_a_rename_moves_the_claim(
    store: DynamoDBStateStore, moto: Moto, make_record: MakeRecord
) -> None:
    record = store.insert(make_record("goose"))
    store.update(record.sandbox_id, status="running")
    store.update(record.sandbox_id, alias="gander")
    items = raw_items(moto)
    assert items[f"sandbox#{record.sandbox_id}"]["version"] == {"N": "3"}
    assert set(items) == {f"sandbox#{record.sandbox_id}", "alias#gander", "number#1"}


def test_list_reads_every_page_of_the_scan(store: DynamoDBStateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan returns at most 1 MB a page; here every page holds two items, so five sandboxes take eight pages."""
    stored = [store.insert(new_record(f"sandbox{index}")) for index in range(5)]
    real = clients.client("dynamodb", REGION)
    pages: list[int] = []

    def scan(**request: Any) -> Any:
        answer = real.scan(**request, Limit=2)
        pages.append(answer["Count"])
        return answer

    intercept(monkeypatch, scan=scan)
    assert DynamoDBStateStore(TABLE, REGION).list() == stored
    assert len(pages) >= 7


def test_a_record_km_cannot_read_is_named(store: DynamoDBStateStore, moto: Moto) -> None:
    moto.client("dynamodb").put_item(
        TableName=TABLE, Item={"pk": {"S": "sandbox#sb-0000beef"}, "version": {"N": "1"}, "sandbox_id": {"S": "sb-0000beef"}}
    )
    with pytest.raises(StateError, match="'sandbox#sb-0000beef' in DynamoDB table km-sandboxes is not a sandbox record"):
        store.list()


def test_a_claim_without_its_record_is_named(store: DynamoDBStateStore, moto: Moto) -> None:
    moto.client("dynamodb").put_item(TableName=TABLE, Item={"pk": {"S": "alias#ghost"}, "sandbox_id": {"S": "sb-0000beef"}})
    with pytest.raises(StateError, match="item alias#ghost .* says sandbox sb-0000beef holds alias 'ghost'"):
        store.find_by_alias("ghost")


# --- AWS errors --------------------------------------------------------------------------------

OPERATIONS = {
    "insert": lambda store: store.insert(new_record()),
    "get": lambda store: store.get("sb-00000000"),
    "find_by_alias": lambda store: store.find_by_alias("goose"),
    "resolve": lambda store: store.resolve("#1"),
    "list": lambda store: store.list(),
    "update": lambda store: store.update("sb-00000000", status="running"),
    "delete": lambda store: store.delete("sb-00000000"),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_missing_table_says_run_km_init(moto: Moto, operation: str) -> None:
    with pytest.raises(StateError) as caught:
        OPERATIONS[operation](DynamoDBStateStore(TABLE, REGION))
    assert str(caught.value) == "DynamoDB table km-sandboxes not found in us-east-1: run `km init`"
    assert not isinstance(caught.value, SandboxNotFound)


class Intercepted:
    """A real DynamoDB client with some of its calls replaced."""

    def __init__(self, real: Any, **replacements: Callable[..., Any]) -> None:
        self.real = real
        self.replacements = replacements

    def __getattr__(self, name: str) -> Any:
        return self.replacements.get(name) or getattr(self.real, name)


def intercept(monkeypatch: pytest.MonkeyPatch, **replacements: Callable[..., Any]) -> Any:
    """Make the clients km creates from now on intercepted ones; the real client, for the replacements to call."""
    real = clients.client("dynamodb", REGION)
    monkeypatch.setattr(clients, "client", lambda service, region: Intercepted(real, **replacements))
    return real


class Failing:
    """A call that fails with the AWS error `code` its first `times` times (forever if negative), then goes through.

    A cancelled transaction gives `reason` for each of its items; DynamoDB answers TransactionConflict when
    another transaction was writing one of the same items.
    """

    def __init__(self, call: Callable[..., Any], code: str, times: int, reason: str = "TransactionConflict") -> None:
        self.call, self.code, self.left, self.reason, self.failures = call, code, times, reason, 0

    def __call__(self, **request: Any) -> Any:
        from botocore.exceptions import ClientError

        if self.left == 0:
            return self.call(**request)
        self.left -= 1
        self.failures += 1
        response: dict[str, Any] = {"Error": {"Code": self.code, "Message": f"injected {self.code}"}}
        if self.code == "TransactionCanceledException":
            response["CancellationReasons"] = [{"Code": self.reason}] * len(request["TransactItems"])
        raise ClientError(response, "Injected")


def test_other_aws_errors_name_the_table_and_the_call(tables: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = clients.client("dynamodb", REGION)
    intercept(monkeypatch, get_item=Failing(real.get_item, "AccessDeniedException", times=1))
    with pytest.raises(StateError, match=r"DynamoDB GetItem on table km-sandboxes in us-east-1 failed: .*AccessDenied"):
        DynamoDBStateStore(TABLE, REGION).get("sb-00000000")


def test_a_cancellation_for_another_reason_is_not_retried(tables: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = clients.client("dynamodb", REGION)
    failing = Failing(real.transact_write_items, "TransactionCanceledException", times=-1, reason="ThrottlingError")
    intercept(monkeypatch, transact_write_items=failing)
    with pytest.raises(
        StateError,
        match=r"TransactWriteItems \(insert\) on table km-sandboxes in us-east-1 was cancelled \(ThrottlingError, ThrottlingError, ThrottlingError\); retry",
    ):
        DynamoDBStateStore(TABLE, REGION).insert(new_record())
    assert failing.failures == 1


def test_an_unreachable_endpoint_is_a_state_error(tables: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(clients, "RETRY_ATTEMPTS", 1)
    clients._session.cache_clear()
    with pytest.raises(StateError, match="DynamoDB Scan on table km-sandboxes in us-east-1 failed: .*check the network"):
        DynamoDBStateStore(TABLE, REGION).list()


# --- conflicts ---------------------------------------------------------------------------------


def test_transaction_conflicts_are_retried(tables: list[str], moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    real = clients.client("dynamodb", REGION)
    conflicting = Failing(real.transact_write_items, "TransactionCanceledException", times=2)
    intercept(monkeypatch, transact_write_items=conflicting)
    store = DynamoDBStateStore(TABLE, REGION)
    record = store.insert(new_record("goose"))
    conflicting.left = 2
    assert store.update(record.sandbox_id, alias="gander").alias == "gander"
    assert_claims_match_records(moto)
    conflicting.left = 2
    store.delete(record.sandbox_id)
    assert conflicting.failures == 6
    assert raw_items(moto) == {}


def test_endless_conflicts_give_up_with_a_state_error(tables: list[str], moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    real = clients.client("dynamodb", REGION)
    intercept(monkeypatch, transact_write_items=Failing(real.transact_write_items, "TransactionCanceledException", times=-1))
    monkeypatch.setattr(dynamodb_store, "INSERT_ATTEMPTS", 3)
    monkeypatch.setattr(dynamodb_store, "_back_off", lambda attempt, reasons: None)
    with pytest.raises(StateError, match="took each free number first, 3 times; retry"):
        DynamoDBStateStore(TABLE, REGION).insert(new_record())
    assert raw_items(moto) == {}


def test_a_number_claimed_by_a_write_the_scan_missed_is_skipped(
    store: DynamoDBStateStore, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan need not show a claim another operator's transaction is writing that moment; the claim's condition
    catches it, and the insert moves on to the next number."""
    first = store.insert(new_record("first"))
    real = clients.client("dynamodb", REGION)

    def scan_missing_number_claims(**request: Any) -> Any:
        if request["ExpressionAttributeValues"][":prefix"] == {"S": "number#"}:
            return {"Items": []}
        return real.scan(**request)

    intercept(monkeypatch, scan=scan_missing_number_claims)
    second = DynamoDBStateStore(TABLE, REGION).insert(new_record("second"))
    assert (first.number, second.number) == (1, 2)
    assert_claims_match_records(moto)


# --- tables ------------------------------------------------------------------------------------


def create_table(moto: Moto, name: str) -> None:
    moto.client("dynamodb").create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )


def test_ensure_tables_creates_both_once(moto: Moto) -> None:
    config = OperatorConfig()
    assert missing_tables(config, REGION) == ["km-sandboxes", "km-schedules"]
    assert moto.client("dynamodb").list_tables()["TableNames"] == [], "the dry run creates nothing"
    assert ensure_tables(config, REGION) == ["km-sandboxes", "km-schedules"]
    assert ensure_tables(config, REGION) == []
    assert missing_tables(config, REGION) == []
    for name in ("km-sandboxes", "km-schedules"):
        table = moto.client("dynamodb").describe_table(TableName=name)["Table"]
        assert table["TableStatus"] == "ACTIVE"
        assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
        assert table["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


def test_ensure_tables_uses_the_configured_names_and_creates_only_what_is_missing(moto: Moto) -> None:
    config = OperatorConfig(resource_prefix="team", schedules_table="shared-schedules")
    create_table(moto, "shared-schedules")
    assert missing_tables(config, REGION) == ["team-sandboxes"]
    assert ensure_tables(config, REGION) == ["team-sandboxes"]
    assert sorted(moto.client("dynamodb").list_tables()["TableNames"]) == ["shared-schedules", "team-sandboxes"]


def test_operators_running_ensure_tables_at_once_create_each_table_once(moto: Moto) -> None:
    barrier = threading.Barrier(4)
    created: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait(timeout=30)
        try:
            created.extend(ensure_tables(OperatorConfig(), REGION))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(created) == ["km-sandboxes", "km-schedules"]


def test_ensure_tables_waits_until_active(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    statuses = iter(["CREATING", "CREATING"])
    polls: list[str] = []
    real = clients.client("dynamodb", REGION)
    create_table(moto, "km-schedules")  # by another operator, a moment ago

    def describe_table(TableName: str) -> Any:  # noqa: N803 (boto3's spelling)
        answer = real.describe_table(TableName=TableName)
        if TableName == "km-schedules":
            answer["Table"]["TableStatus"] = next(statuses, "ACTIVE")
            polls.append(answer["Table"]["TableStatus"])
        return answer

    intercept(monkeypatch, describe_table=describe_table)
    monkeypatch.setattr(dynamodb_store, "TABLE_POLL_SECONDS", 0.01)
    assert ensure_tables(OperatorConfig(), REGION) == ["km-sandboxes"]
    assert polls == ["CREATING", "CREATING", "ACTIVE"], "an existing table still CREATING is waited for"


def test_a_table_that_never_becomes_active_is_reported(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    real = clients.client("dynamodb", REGION)

    def describe_table(TableName: str) -> Any:  # noqa: N803 (boto3's spelling)
        answer = real.describe_table(TableName=TableName)
        answer["Table"]["TableStatus"] = "CREATING"
        return answer

    intercept(monkeypatch, describe_table=describe_table)
    monkeypatch.setattr(dynamodb_store, "TABLE_POLL_SECONDS", 0.01)
    monkeypatch.setattr(dynamodb_store, "TABLE_ACTIVE_TIMEOUT_SECONDS", 0.05)
    with pytest.raises(StateError, match="DynamoDB table km-sandboxes in us-east-1 is still CREATING after 0.05 s"):
        ensure_tables(OperatorConfig(), REGION)


def test_an_update_based_on_a_stale_read_is_redone_not_lost(
    store: DynamoDBStateStore, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another operator's write lands between this store's read and its write: the write must not undo it."""
    record = store.insert(new_record("goose"))
    real = clients.client("dynamodb", REGION)
    stale = [real.get_item(TableName=TABLE, Key={"pk": {"S": f"sandbox#{record.sandbox_id}"}}, ConsistentRead=True)]
    store.update(record.sandbox_id, locked=True)  # the other operator, after our read below was taken

    def get_item(**request: Any) -> Any:
        return stale.pop() if stale else real.get_item(**request)

    intercept(monkeypatch, get_item=get_item)
    updated = DynamoDBStateStore(TABLE, REGION).update(record.sandbox_id, status="running")
    assert (updated.status, updated.locked) == ("running", True)
    assert store.get(record.sandbox_id) == updated
    assert raw_items(moto)[f"sandbox#{record.sandbox_id}"]["version"] == {"N": "3"}
