"""The host agent bundle on the ec2 side: reproducible, stored once per content, handed to a launching
instance as a presigned URL and checksum in its identity, and refused for an architecture whose BPF
objects this machine cannot provide. (Installing it is run for real in tests/sandbox/test_host_agent_bundle.py.)"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

import pytest

from controller.substrates.ec2.bundle import build_bundle, local_architecture, publish_bundle
from controller.substrates.ec2.errors import Ec2Error
from controller.substrates.ec2.network import find_vpc
from controller.substrates.ec2.provision import sandbox_identity
from controller.substrates.ec2.userdata import userdata_key
from ebpf.objects import build_all
from tests.aws.commands import km
from tests.aws.conftest import REGION, Moto
from tests.aws.ec2_support import BUCKET, aws_calls, compiled, make_bucket, operator_config, sandbox_tags, tagged, writes
from tests.conftest import REPO_ROOT


def test_the_bundle_is_reproducible_and_carries_what_the_instance_needs() -> None:
    first, second = build_bundle(), build_bundle()

    assert first == second and first.sha256 == hashlib.sha256(first.data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(first.data)) as archive:
        members = {member.name: member for member in archive.getmembers()}
    assert members["install-host-agent.sh"].mode == 0o755
    assert {"requirements.txt", "host_agent/cli.py", "host_agent/systemd/run-kmgate.mount", "ebpf/libbpf.py"} <= set(members)
    objects = sorted(name for name in members if name.endswith(".bpf.o"))
    assert objects == sorted(f"ebpf/objects/{path.name}" for path in build_all())  # current objects only
    assert not [name for name in members if "__pycache__" in name or name.endswith(".pyc")]
    assert {(member.uid, member.mtime) for member in members.values()} == {(0, 0)}


def test_it_is_uploaded_once_and_fetched_by_url_with_its_checksum(moto: Moto) -> None:
    make_bucket(moto)
    arch = local_architecture()
    assert arch is not None

    env = publish_bundle(REGION, BUCKET, arch)
    with aws_calls() as calls:
        again = publish_bundle(REGION, BUCKET, arch)

    assert writes(calls) == {}  # the same content is not uploaded twice
    assert again["KM_HOST_AGENT_BUNDLE_SHA256"] == env["KM_HOST_AGENT_BUNDLE_SHA256"]
    body = urllib.request.urlopen(env["KM_HOST_AGENT_BUNDLE_URL"], timeout=10).read()  # moto on loopback
    assert hashlib.sha256(body).hexdigest() == env["KM_HOST_AGENT_BUNDLE_SHA256"]
    keys = [item["Key"] for item in moto.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == [f"km/host-agent/{env['KM_HOST_AGENT_BUNDLE_SHA256']}.tar.gz"]


def test_another_architecture_is_refused_with_the_fix(moto: Moto) -> None:
    make_bucket(moto)
    other = "arm64" if local_architecture() == "x86_64" else "x86_64"

    with pytest.raises(Ec2Error, match=f"the instance runs {other}.*an image with km-host-agent baked in"):
        publish_bundle(REGION, BUCKET, other)

    assert "Contents" not in moto.client("s3").list_objects_v2(Bucket=BUCKET)


def test_a_created_instance_boots_with_the_bundle(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path / "state"))
    km("init")
    created = km("create", "goose", "--json")
    sandbox_id = json.loads(created.stdout)["sandbox"]["id"]
    [instance_id] = tagged(moto, sandbox_id)["instances"]
    bucket = next(b["Name"] for b in moto.client("s3").list_buckets()["Buckets"] if b["Name"].startswith("km-artifacts-"))

    encoded = moto.client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(encoded).decode()
    if "KM_SANDBOX_ENV" not in script:  # over 16 KB: the instance fetches the whole script from S3
        script = moto.client("s3").get_object(Bucket=bucket, Key=userdata_key(sandbox_id))["Body"].read().decode()
    url = re.search(r"^KM_HOST_AGENT_BUNDLE_URL='([^']+)'$", script, re.MULTILINE)
    digest = re.search(r"^KM_HOST_AGENT_BUNDLE_SHA256=([0-9a-f]{64})$", script, re.MULTILINE)
    assert url and digest, script[:2000]
    assert hashlib.sha256(urllib.request.urlopen(url.group(1), timeout=10).read()).hexdigest() == digest.group(1)
    assert "bash /opt/km/bundle/install-host-agent.sh" in script  # the compiled section that uses them


def test_an_operators_package_index_reaches_the_installer(moto: Moto) -> None:
    """Accounts without a route to PyPI name their mirror once, in the km configuration."""
    goose = compiled()
    config = operator_config(pip_index_url="https://pypi.internal.example/simple")
    vpc = find_vpc(REGION, config)

    identity = sandbox_identity(sandbox_tags(goose), REGION, vpc, BUCKET, config)

    assert identity["KM_PIP_INDEX_URL"] == "https://pypi.internal.example/simple"
    assert "KM_PIP_INDEX_URL" in (REPO_ROOT / "controller/substrates/ec2/install-host-agent.sh").read_text()
    assert "KM_PIP_INDEX_URL" not in sandbox_identity(sandbox_tags(goose), REGION, vpc, BUCKET, operator_config())
