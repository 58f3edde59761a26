"""`km init` against moto, as the operator runs it (a subprocess): it makes the shared resources with the
defaults, reports them, makes nothing the second time, and `--dry-run` changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.aws.lambda_package import build_zip, code_sha256
from tests.aws.conftest import Moto
from tests.conftest import REPO_ROOT

KM = Path(sys.executable).parent / "km"
BUCKET = "km-artifacts-123456789012-us-east-1"


def km_init(*flags: str) -> Any:
    done = subprocess.run(
        [KM, "init", "--json", *flags], capture_output=True, text=True, env=os.environ.copy(), cwd=REPO_ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_init_makes_the_shared_resources_once(moto: Moto) -> None:
    assert {(r["name"], r["state"]) for r in km_init("--dry-run")} == {
        (BUCKET, "missing"),
        ("km-sandboxes", "missing"),
        ("km-schedules", "missing"),
        ("km-ttl-handler", "missing"),
        ("km-ttl-scheduler", "missing"),
        ("km-efs", "missing"),
    }
    assert moto.client("s3").list_buckets()["Buckets"] == []  # the dry run made nothing

    first = km_init()

    assert [r["state"] for r in first] == ["created"] * 7
    s3 = moto.client("s3")
    encryption = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert encryption["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert all(s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"].values())
    rules = {rule["ID"]: rule for rule in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    assert rules["km-expire-telemetry"]["Expiration"]["Days"] == 90
    tables = moto.client("dynamodb").list_tables()["TableNames"]
    assert sorted(tables) == ["km-sandboxes", "km-schedules"]
    iam = moto.client("iam")
    trust = iam.get_role(RoleName="km-ttl-scheduler")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "scheduler.amazonaws.com"}
    invoke = json.loads(json.dumps(iam.get_role_policy(RoleName="km-ttl-scheduler", PolicyName="km")["PolicyDocument"]))
    assert invoke["Statement"][0]["Resource"] == "arn:aws:lambda:us-east-1:123456789012:function:km-ttl-handler"
    handler = moto.client("lambda").get_function(FunctionName="km-ttl-handler")["Configuration"]
    assert (handler["Handler"], handler["Runtime"]) == ("controller.lifecycle.handler", "python3.11")
    assert handler["CodeSha256"] == code_sha256(build_zip())
    assert handler["Environment"]["Variables"]["KM_SANDBOXES_TABLE"] == "km-sandboxes"

    [efs] = moto.client("efs").describe_file_systems()["FileSystems"]
    assert efs["Encrypted"] and efs["CreationToken"] == "km-efs"
    targets = moto.client("efs").describe_mount_targets(FileSystemId=efs["FileSystemId"])["MountTargets"]
    assert len({target["AvailabilityZoneName"] for target in targets}) == len(targets) >= 1

    second = km_init()

    assert {r["state"] for r in second} == {"exists"}
    assert len(moto.client("efs").describe_mount_targets(FileSystemId=efs["FileSystemId"])["MountTargets"]) == len(targets)


def test_init_writes_the_configuration_when_there_is_none(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KM_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))

    made = km_init()

    written = yaml.safe_load((tmp_path / "xdg" / "km" / "config.yaml").read_text())
    efs = next(r["name"] for r in made if r["kind"] == "efs-file-system")
    assert written == {"efs_id": efs, "region": "us-east-1", "resource_prefix": "km"}


def test_a_configured_prefix_names_everything(moto: Moto, tmp_path: Path) -> None:
    Path(os.environ["KM_CONFIG"]).write_text("resource_prefix: team\nartifacts_bucket: team-artifacts\n")

    made = km_init()

    named = {r["name"] for r in made if r["kind"] != "efs-file-system"}
    assert named == {"team-artifacts", "team-sandboxes", "team-schedules", "team-ttl-handler", "team-ttl-scheduler"}
    assert moto.client("efs").describe_file_systems()["FileSystems"][0]["CreationToken"] == "team-efs"


def test_the_handler_package_is_the_same_bytes_for_the_same_code() -> None:
    assert build_zip() == build_zip()
