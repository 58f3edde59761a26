"""Throttling is retried, not surfaced: a proxy on loopback in front of moto answers the first requests
with 503 ThrottlingException (as AWS does under load), and km's commands still succeed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from controller.aws import clients
from controller.aws.config import OperatorConfig
from controller.state.dynamodb import DynamoDBStateStore, ensure_tables
from tests.aws.conftest import REGION, Moto
from tests.aws.proxy import ThrottlingProxy
from tests.unit.controller.state.conftest import new_record


@pytest.fixture
def proxy(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThrottlingProxy]:
    running = ThrottlingProxy(moto.endpoint, first=3, every=4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", running.endpoint)
    clients._session.cache_clear()
    yield running
    running.close()
    clients._session.cache_clear()


def test_throttled_calls_are_retried_until_they_succeed(proxy: ThrottlingProxy) -> None:
    ensure_tables(OperatorConfig(), REGION)
    store = DynamoDBStateStore("km-sandboxes", REGION)

    made = [store.insert(new_record(f"alias-{index}")) for index in range(5)]

    assert [record.number for record in store.list()] == [record.number for record in made] == [1, 2, 3, 4, 5]
    assert proxy.throttled >= 3 and proxy.seen > proxy.throttled
    assert os.environ["AWS_ENDPOINT_URL"] == proxy.endpoint  # every call went through the proxy
