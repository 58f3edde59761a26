"""km's clients reach the endpoint the environment names; the operator's configuration has defaults that
need no file, a file that is checked like a profile, and KM_* variables on top."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.aws import clients
from controller.aws.config import OperatorConfigError, load_operator_config
from tests.aws.conftest import Moto, free_port


def test_clients_go_to_the_moto_server_from_the_environment(moto: Moto) -> None:
    clients.client("s3", "us-east-1").create_bucket(Bucket="seen-through-km")

    assert [b["Name"] for b in moto.client("s3").list_buckets()["Buckets"]] == ["seen-through-km"]
    assert clients.account_id("us-east-1") == "123456789012"  # moto's account


def test_a_service_endpoint_overrides_the_general_one(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_<SERVICE> wins for that service (e.g. S3 through a VPC endpoint or a local copy)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
    clients._session.cache_clear()  # sessions read the environment when made

    clients.client("s3", "us-east-1").create_bucket(Bucket="through-the-s3-endpoint")

    assert [b["Name"] for b in moto.client("s3").list_buckets()["Buckets"]] == ["through-the-s3-endpoint"]
    assert clients.client("sts", "us-east-1").meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    clients._session.cache_clear()


def test_no_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_operator_config({"HOME": str(tmp_path)})

    assert config.resource_prefix == "km" and config.vpc_id is None and config.subnet_ids == []
    assert config.effective_region({}) == "us-east-1"
    assert config.effective_region({"AWS_DEFAULT_REGION": "eu-west-1"}) == "eu-west-1"
    assert config.table("sandboxes") == "km-sandboxes" and config.table("schedules") == "km-schedules"
    assert config.bucket("123456789012", "eu-west-1") == "km-artifacts-123456789012-eu-west-1"


def test_the_file_then_km_variables(tmp_path: Path) -> None:
    file = tmp_path / "km" / "config.yaml"
    file.parent.mkdir()
    file.write_text("resource-prefix: team\nregion: eu-central-1\nsubnet_ids: [subnet-1]\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path), "KM_REGION": "eu-west-3", "KM_SUBNET_IDS": "subnet-a,subnet-b"}

    config = load_operator_config(env)

    assert (config.resource_prefix, config.region, config.subnet_ids) == ("team", "eu-west-3", ["subnet-a", "subnet-b"])
    assert config.table("sandboxes") == "team-sandboxes"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resource_prefx: km\n", "resource_prefx: Extra inputs are not permitted"),
        ("resource_prefix: Not-A-Prefix\n", "resource_prefix: String should match pattern"),
        ("- a list\n", "expected a mapping of settings"),
        ("region: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_file_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(text)
    with pytest.raises(OperatorConfigError, match=message):
        load_operator_config({"KM_CONFIG": str(file)})


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError, match="KM_CONFIG=.*no such file"):
        load_operator_config({"KM_CONFIG": str(tmp_path / "absent.yaml")})
