"""Fault tests: `km create goose` on ec2 killed (SIGKILL, so no cleanup runs) just before each of its
mutating AWS calls, then run again. The re-run must leave exactly one running sandbox with one of each
resource, nothing orphaned from the killed attempt, and `km destroy` must then remove all of it.

A loopback proxy in front of moto sees km's own requests (km runs as a subprocess, as an operator runs it)
and kills the process when the chosen request arrives, before moto gets it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.aws.commands import KM, km
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import only_instance, tagged
from tests.aws.proxy import LoopbackProxy, Request, Verdict
from tests.conftest import REPO_ROOT

ANY_SANDBOX_ID = re.compile(r"(?<![a-z0-9])[a-z][a-z0-9]{0,11}-[a-f0-9]{8}(?![a-z0-9])")
SHA256 = re.compile(r"(?<![a-f0-9])[a-f0-9]{64}(?![a-f0-9])")
# The mutating calls of one uninterrupted `km create goose` in an account just after `km init`, in order
# (sandbox ids written `{id}`, content hashes `{sha256}`), each with the name its test case goes by.
# Observed once; test_an_uninterrupted_create_makes_these_calls guards it.
CREATE_CALLS = [
    ("dynamodb:TransactWriteItems", "TransactWriteItems"),  # the `starting` record, alias and number
    ("iam:CreateRole", "CreateRole"),
    ("iam:PutRolePolicy", "PutRolePolicy"),
    ("iam:CreateInstanceProfile", "CreateInstanceProfile"),
    ("iam:AddRoleToInstanceProfile", "AddRoleToInstanceProfile"),
    ("ec2:CreateSecurityGroup", "CreateSecurityGroup"),
    ("ec2:RevokeSecurityGroupEgress", "RevokeSecurityGroupEgress"),
    ("ec2:AuthorizeSecurityGroupEgress", "AuthorizeSecurityGroupEgress"),
    # the host agent bundle, named by its hash: only the first create in an account uploads it
    ("s3:PUT /km-artifacts-123456789012-us-east-1/km/host-agent/{sha256}.tar.gz", "PutObject-host-agent-bundle"),
    ("ec2:RunInstances", "RunInstances"),
    ("ec2:CreateVolume", "CreateVolume"),
    ("ec2:AttachVolume", "AttachVolume"),
    ("scheduler:POST /schedules/km-ttl-{id}", "CreateSchedule"),
    ("s3:PUT /km-artifacts-123456789012-us-east-1/artifacts/{id}/applied-plan.json", "PutObject-applied-plan"),
    ("dynamodb:PutItem", "PutItem"),  # the record becomes `running`
]
# The resource steps the issue names, which the sequence must hold in this order.
RESOURCE_STEPS = [
    "dynamodb:TransactWriteItems",
    "iam:CreateRole",
    "iam:CreateInstanceProfile",
    "ec2:CreateSecurityGroup",
    "ec2:RunInstances",
    "ec2:CreateVolume",
    "ec2:AttachVolume",
    "scheduler:POST /schedules/km-ttl-{id}",
    "dynamodb:PutItem",
]


def call_name(request: Request) -> str:
    return SHA256.sub("{sha256}", ANY_SANDBOX_ID.sub("{id}", request.name))


class KillAt:
    """The proxy hook: forward everything, but SIGKILL the victim when the `index`-th mutating call arrives."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.mutating = 0

    def __call__(self, request: Request) -> Verdict:
        if not request.mutating:
            return Verdict.FORWARD
        self.mutating += 1
        return Verdict.KILL if self.mutating - 1 == self.index else Verdict.FORWARD


@dataclass
class Account:
    """The moto account behind the proxy, after `km init`."""

    moto: Moto
    proxy: LoopbackProxy
    shared: frozenset[str] = frozenset()  # role names and security group ids made by `km init`, not by a sandbox
    objects: dict[str, set[str]] = field(default_factory=dict)  # bucket -> keys, just after `km init`

    def initialise(self) -> None:
        """An empty account, then `km init` (its calls go through the proxy but are not the create's)."""
        self.moto.reset()
        km("init")
        roles = [role["RoleName"] for role in self.moto.client("iam").list_roles()["Roles"]]
        groups = [group["GroupId"] for group in self.moto.client("ec2").describe_security_groups()["SecurityGroups"]]
        self.shared = frozenset(roles + groups)
        self.objects = {bucket: self._keys(bucket) for bucket in self._buckets()}

    def restore_objects(self) -> None:
        """Delete what creates put in S3 since `km init` (the host agent bundle, `applied-plan.json`s), so each
        case's create uploads what a create in a fresh account does."""
        s3 = self.moto.client("s3")
        for bucket in self._buckets():
            for key in self._keys(bucket) - self.objects.get(bucket, set()):
                s3.delete_object(Bucket=bucket, Key=key)

    def _buckets(self) -> list[str]:
        return [bucket["Name"] for bucket in self.moto.client("s3").list_buckets()["Buckets"]]

    def _keys(self, bucket: str) -> set[str]:
        pages = self.moto.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture(scope="module")
def initialised(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Account]:
    """The environment of conftest's `moto` fixture, for the whole module: `km init` is the slowest command
    (~4 s) and no case changes what it made, so it runs once (again only after a case left a sandbox).
    Between cases `account` puts S3 back as init left it; what else remains (terminated instances) is
    what any account that had sandboxes holds."""
    home = tmp_path_factory.mktemp("interrupted-create")
    (home / "km-config.yaml").write_text("{}\n")
    proxy = LoopbackProxy(moto_endpoint)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_REGION", REGION)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # every km process goes through the proxy
        patch.setenv("KM_CONFIG", str(home / "km-config.yaml"))
        patch.setenv("KM_CACHE_DIR", str(home / "cache"))
        try:
            yield Account(Moto(moto_endpoint), proxy)
        finally:
            proxy.close()


@pytest.fixture
def account(initialised: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Account:
    """The initialised account with no sandbox in it, the proxy passing everything, a private local store."""
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    if not initialised.shared or any(owners(initialised).values()):
        initialised.initialise()
    else:
        initialised.restore_objects()
    initialised.proxy.hook, initialised.proxy.victim = None, None
    return initialised


def owners(account: Account) -> dict[str, list[str]]:
    """Every sandbox resource in the account, by kind, as the sandbox id it belongs to (`?` when untagged)."""
    moto = account.moto
    ec2, iam = moto.client("ec2"), moto.client("iam")

    def owner(tags: list[dict[str, str]] | None) -> str:
        return next((tag["Value"] for tag in tags or [] if tag["Key"] == "km:sandbox-id"), "?")

    def named(names: list[str], prefix: str) -> list[str]:
        return sorted(name.removeprefix(prefix) for name in names if name.startswith(prefix))

    roles = [role["RoleName"] for role in iam.list_roles()["Roles"] if role["RoleName"] not in account.shared]
    profiles = [profile["InstanceProfileName"] for profile in iam.list_instance_profiles()["InstanceProfiles"]]
    schedules = [schedule["Name"] for schedule in moto.client("scheduler").list_schedules()["Schedules"]]
    rows = [item["pk"]["S"] for item in moto.client("dynamodb").scan(TableName="km-sandboxes")["Items"]]
    return {
        "instances": sorted(
            owner(item.get("Tags"))
            for reservation in ec2.describe_instances()["Reservations"]
            for item in reservation["Instances"]
            if item["State"]["Name"] != "terminated"
        ),
        "data_volumes": sorted(
            owner(volume.get("Tags"))
            for volume in ec2.describe_volumes()["Volumes"]
            if any(tag["Key"] == "km:device" for tag in volume.get("Tags", []))
        ),
        "security_groups": sorted(
            owner(group.get("Tags"))
            for group in ec2.describe_security_groups()["SecurityGroups"]
            if group["GroupId"] not in account.shared
        ),
        "roles": named(roles, "km-") + ["?"] * sum(not name.startswith("km-") for name in roles),
        "instance_profiles": named(profiles, "km-") + ["?"] * sum(not name.startswith("km-") for name in profiles),
        "schedules": named(schedules, "km-ttl-") + ["?"] * sum(not name.startswith("km-ttl-") for name in schedules),
        "records": named(rows, "sandbox#"),
    }


def create_and_record(account: Account) -> tuple[str, list[str]]:
    """One uninterrupted `km create goose`: its sandbox id and its mutating calls, ids written `{id}`."""
    before = account.proxy.seen
    created = json.loads(km("create", "goose", "--json").stdout)
    calls = [call_name(request) for request in account.proxy.log.requests[before:] if request.mutating]
    return str(created["sandbox"]["id"]), calls


def records(account: Account) -> dict[str, str]:
    """sandbox id -> status of every record in the DynamoDB store."""
    items = account.moto.client("dynamodb").scan(TableName="km-sandboxes")["Items"]
    return {
        item["pk"]["S"].removeprefix("sandbox#"): item["status"]["S"] for item in items if item["pk"]["S"].startswith("sandbox#")
    }


def assert_one_sandbox(account: Account) -> str:
    """`km list` shows goose running, and everything in the account belongs to it, one of each."""
    [entry] = json.loads(km("list", "--json").stdout)
    sandbox_id = str(entry["id"])
    assert (entry["alias"], entry["status"]) == ("goose", "running"), entry
    found = owners(account)
    assert found == {
        "instances": [sandbox_id],
        "data_volumes": [sandbox_id],
        "security_groups": [sandbox_id],
        "roles": [sandbox_id],
        "instance_profiles": [sandbox_id],
        "schedules": [sandbox_id],
        "records": [sandbox_id],
    }, found
    resources = tagged(account.moto, sandbox_id)
    assert resources["roles"] == [f"km-{sandbox_id}"] and resources["instance_profiles"] == [f"km-{sandbox_id}"]
    instance = only_instance(account.moto, sandbox_id)
    assert [group["GroupId"] for group in instance["SecurityGroups"]] == resources["security_groups"]
    assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/km-{sandbox_id}")
    attached = {mapping["Ebs"]["VolumeId"] for mapping in instance["BlockDeviceMappings"]}
    assert set(resources["volumes"]) <= attached, (resources["volumes"], attached)  # the data volume is on it
    row = account.moto.client("dynamodb").get_item(TableName="km-sandboxes", Key={"pk": {"S": f"sandbox#{sandbox_id}"}})["Item"]
    assert row["status"]["S"] == "running" and row["resources"]["M"]["instance_id"]["S"] == instance["InstanceId"]
    return sandbox_id


def destroy_and_assert_nothing_left(account: Account) -> None:
    km("destroy", "goose", "--yes")
    found = owners(account)
    assert all(not owned for owned in found.values()), found


def test_an_uninterrupted_create_makes_these_calls(account: Account) -> None:
    """The resource steps, in order, and exactly CREATE_CALLS, so the kill points below stay the real ones."""
    sandbox_id, calls = create_and_record(account)

    steps = iter(calls)
    shown = "\n  ".join(calls)
    assert all(step in steps for step in RESOURCE_STEPS), f"the resource steps are not all there, in order:\n  {shown}"
    assert calls == [name for name, _ in CREATE_CALLS], f"the create's mutating calls changed:\n  {shown}"
    assert assert_one_sandbox(account) == sandbox_id
    destroy_and_assert_nothing_left(account)
    assert json.loads(km("list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("index", "expected"),
    [pytest.param(index, name, id=f"kill-before-{label}") for index, (name, label) in enumerate(CREATE_CALLS)],
)
def test_a_create_killed_before_a_call_is_finished_by_the_next(account: Account, index: int, expected: str) -> None:
    """Whatever step the operator's create died at, running it again gives one whole sandbox, no orphans."""
    proxy = account.proxy
    proxy.hook, kills = KillAt(index), len(proxy.log.killed)
    killed = subprocess.Popen(
        [KM, "create", "goose", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    proxy.victim = killed.pid  # km makes its first mutating call after ~1 s of imports and reads
    try:
        out, err = killed.communicate(timeout=120)
    finally:
        if killed.poll() is None:  # never reached the call: do not leave it running
            killed.kill()
            killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, f"not killed: {killed.returncode}\n{out}\n{err}"
    assert [call_name(request) for request in proxy.log.killed[kills:]] == [expected]
    proxy.hook = proxy.victim = None
    left = records(account)
    assert list(left.values()) == ([] if index == 0 else ["starting"]), left  # the record goes in first

    rerun = json.loads(km("create", "goose", "--json").stdout)

    sandbox_id = assert_one_sandbox(account)
    if left:
        assert [sandbox_id] == list(left), f"not finished under the killed create's id {list(left)}: {rerun}"
    destroy_and_assert_nothing_left(account)
