"""Aliases and list numbers belong to the operator, not to a substrate: with local sandboxes in SQLite and
ec2 ones in DynamoDB, `#2` and `goose` must each still name exactly one sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.state import SQLiteStateStore, default_state_path
from tests.aws.commands import km
from tests.aws.conftest import Moto
from tests.aws.ec2_support import tagged
from tests.unit.controller.state.conftest import new_record


@pytest.fixture
def local_store(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SQLiteStateStore:
    """This operator's local store, holding one stopped local sandbox (#1): a record is all these tests need."""
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    store = SQLiteStateStore(default_state_path())
    store.insert(new_record("elsewhere", status="stopped"))
    return store


def test_an_ec2_sandbox_takes_a_number_no_local_one_has(local_store: SQLiteStateStore, moto: Moto) -> None:
    km("init")

    created = json.loads(km("create", "goose", "--json").stdout)["sandbox"]

    assert created["number"] == 2
    listed = {entry["number"]: (entry["alias"], entry["substrate"]) for entry in json.loads(km("list", "--json").stdout)}
    assert listed == {1: ("elsewhere", "local"), 2: ("goose", "ec2")}
    assert json.loads(km("status", "2", "--json").stdout)["id"] == created["id"]
    km("destroy", "goose", "--yes")


@pytest.mark.root
def test_an_alias_moving_to_another_substrate_is_a_replacement(local_store: SQLiteStateStore, moto: Moto) -> None:
    """`km create goose` on ec2 while `goose` is a local sandbox replaces it rather than making a second goose."""
    km("init")
    local = local_store.insert(new_record("goose", status="stopped"))

    planned = km("create", "goose", "--dry-run")

    assert planned.stdout.startswith("would goose: replace: it runs on local, the plan says ec2"), planned.stdout
    assert local_store.find_by_alias("goose") == local  # a dry run changes nothing
    created = json.loads(km("create", "goose", "--json").stdout)["sandbox"]
    assert created["substrate"] == "ec2" and created["id"] != local.sandbox_id
    assert local_store.find_by_alias("goose") is None
    assert [entry["alias"] for entry in json.loads(km("list", "--json").stdout)].count("goose") == 1
    assert len(tagged(moto, created["id"])["instances"]) == 1
    km("destroy", "goose", "--yes")
