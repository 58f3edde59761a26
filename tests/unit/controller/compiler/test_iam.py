"""The sandbox role's policy: region lock, Bedrock only when used, own artifacts only, listed secrets only."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile, render_iam_policy
from controller.compiler.iam import iam_policy
from controller.profile import BUILTIN_PROFILES_DIR
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
SANDBOX_ID = "${km:SandboxId}"
BUCKET = "${km:ArtifactsBucket}"
S3_WRITE_ACTIONS = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:*", "*")


def statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    assert policy["Version"] == "2012-10-17"
    return list(policy["Statement"])


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def actions_of(policy: dict[str, Any], effect: str = "Allow") -> list[str]:
    return [
        action for statement in statements(policy) if statement["Effect"] == effect for action in as_list(statement["Action"])
    ]


def set_regions(regions: list[str] | None, region: str = "us-east-1") -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        spec["runtime"]["region"] = region
        if regions is None:
            del spec["identity"]
        else:
            spec["identity"]["allowedRegions"] = regions

    return edit


@pytest.mark.parametrize(
    ("regions", "region", "locked_to"),
    [
        (["us-east-1"], "us-east-1", ["us-east-1"]),
        (["us-east-1", "eu-west-1"], "us-east-1", ["us-east-1", "eu-west-1"]),
        (["eu-west-1", "us-east-1", "ap-southeast-2"], "us-east-1", ["eu-west-1", "us-east-1", "ap-southeast-2"]),
        # Without an identity section the sandbox may only call its own region.
        (None, "us-east-1", ["us-east-1"]),
        (None, "eu-central-1", ["eu-central-1"]),
    ],
)
def test_region_lock_denies_everything_outside_the_allowed_regions(
    tmp_path: Path, regions: list[str] | None, region: str, locked_to: list[str]
) -> None:
    policy = iam_policy(goose_variant(tmp_path, set_regions(regions, region)))
    denies = [statement for statement in statements(policy) if statement["Effect"] == "Deny"]
    assert len(denies) == 1
    (deny,) = denies
    assert deny["Action"] == "*"
    assert deny["Resource"] == "*"
    assert deny["Condition"] == {"StringNotEquals": {"aws:RequestedRegion": locked_to}}


@pytest.mark.parametrize("use_bedrock", [True, False])
def test_bedrock_statement_only_when_the_profile_uses_bedrock(tmp_path: Path, use_bedrock: bool) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["useBedrock"] = use_bedrock

    policy = iam_policy(goose_variant(tmp_path, edit))
    bedrock_actions = [action for action in actions_of(policy) if action.startswith("bedrock:")]
    if use_bedrock:
        (statement,) = [s for s in statements(policy) if any(a.startswith("bedrock:") for a in as_list(s["Action"]))]
        assert statement["Effect"] == "Allow"
        assert {"bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"} <= set(bedrock_actions)
        # Invoking only: nothing that manages models, guardrails or provisioned throughput.
        assert all(action.startswith(("bedrock:Invoke", "bedrock:Converse")) for action in bedrock_actions)
        assert "arn:aws:bedrock:us-east-1:*:inference-profile/*" in as_list(statement["Resource"])
    else:
        assert bedrock_actions == []
        assert not any("bedrock" in json.dumps(statement).lower() for statement in statements(policy))


def test_bedrock_inference_profiles_follow_the_allowed_regions(tmp_path: Path) -> None:
    policy = iam_policy(goose_variant(tmp_path, set_regions(["us-east-1", "us-west-2"])))
    (statement,) = [s for s in statements(policy) if s.get("Sid") == "BedrockInvoke"]
    profiles = sorted(r for r in as_list(statement["Resource"]) if ":inference-profile/" in r)
    assert profiles == ["arn:aws:bedrock:us-east-1:*:inference-profile/*", "arn:aws:bedrock:us-west-2:*:inference-profile/*"]


def test_s3_access_is_scoped_to_the_sandbox(tmp_path: Path) -> None:
    policy = iam_policy(goose_variant(tmp_path))
    s3_statements = [s for s in statements(policy) if any(a.startswith("s3:") for a in as_list(s["Action"]))]
    assert s3_statements, "the sandbox must be able to upload its own artifacts"
    own_object = re.compile(r"arn:aws:s3:::\$\{km:ArtifactsBucket\}/[a-z-]+/\$\{km:SandboxId\}/\*")
    for statement in s3_statements:
        assert statement["Effect"] == "Allow"
        resources = as_list(statement["Resource"])
        if as_list(statement["Action"]) == ["s3:ListBucket"]:
            # Listing names the bucket, so the prefix condition is what confines it.
            assert resources == [f"arn:aws:s3:::{BUCKET}"]
            prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
            assert prefixes and all(f"/{SANDBOX_ID}/" in prefix for prefix in as_list(prefixes))
            continue
        for resource in resources:
            assert SANDBOX_ID in resource
            assert own_object.fullmatch(resource), resource


def test_no_statement_writes_bucket_wide(tmp_path: Path) -> None:
    policy = iam_policy(goose_variant(tmp_path))
    for statement in statements(policy):
        if statement["Effect"] != "Allow":
            continue
        actions = as_list(statement["Action"])
        assert "*" not in actions and "s3:*" not in actions
        if not any(action in S3_WRITE_ACTIONS or action.startswith("s3:Put") for action in actions):
            continue
        for resource in as_list(statement["Resource"]):
            assert resource not in ("*", "arn:aws:s3:::*", f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*")
            assert resource.startswith(f"arn:aws:s3:::{BUCKET}/") and f"/{SANDBOX_ID}/" in resource


@pytest.mark.parametrize(
    ("paths", "regions"),
    [
        ([], ["us-east-1"]),
        (["/km/goose/api-key"], ["us-east-1"]),
        (["/km/goose/api-key", "/team/shared/token"], ["us-east-1", "eu-west-1"]),
    ],
)
def test_secrets_only_for_allowed_secret_paths(tmp_path: Path, paths: list[str], regions: list[str]) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["identity"]["allowedRegions"] = regions
        if paths:
            spec["identity"]["allowedSecretPaths"] = paths

    policy = iam_policy(goose_variant(tmp_path, edit))
    ssm_reads = [s for s in statements(policy) if any(a.startswith("ssm:GetParameter") for a in as_list(s["Action"]))]
    if not paths:
        assert ssm_reads == []
        assert not any("parameter" in resource for s in statements(policy) for resource in as_list(s["Resource"]))
        return
    (statement,) = ssm_reads
    assert statement["Effect"] == "Allow"
    assert set(as_list(statement["Action"])) <= {"ssm:GetParameter", "ssm:GetParameters"}
    expected = {f"arn:aws:ssm:{region}:*:parameter{path}" for region in regions for path in paths}
    assert set(as_list(statement["Resource"])) == expected


def test_no_identity_section_means_no_secrets(tmp_path: Path) -> None:
    policy = iam_policy(goose_variant(tmp_path, set_regions(None)))
    assert not [action for action in actions_of(policy) if action.startswith("ssm:GetParameter")]


def test_statement_ids_are_unique_and_valid(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["identity"]["allowedSecretPaths"] = ["/km/goose/api-key"]

    sids = [statement["Sid"] for statement in statements(iam_policy(goose_variant(tmp_path, edit)))]
    assert len(sids) == len(set(sids))
    # IAM accepts only ASCII letters and digits in a Sid.
    assert all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids)


def test_render_substitutes_every_placeholder(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["identity"]["allowedSecretPaths"] = ["/km/goose/api-key"]

    policy = iam_policy(goose_variant(tmp_path, edit))
    before = copy.deepcopy(policy)
    rendered = render_iam_policy(policy, "gebpfgk-0a1b2c3d", "km-artifacts-123456789012")
    text = json.dumps(rendered)
    assert "${km:" not in text and "${" not in text
    assert "arn:aws:s3:::km-artifacts-123456789012/agent-runs/gebpfgk-0a1b2c3d/*" in text
    (listing,) = [s for s in rendered["Statement"] if as_list(s["Action"]) == ["s3:ListBucket"]]
    assert listing["Resource"] == "arn:aws:s3:::km-artifacts-123456789012"
    assert all("gebpfgk-0a1b2c3d" in prefix for prefix in listing["Condition"]["StringLike"]["s3:prefix"])
    # Only placeholders change: the rest of the document is the same, and the input is left alone.
    assert policy == before
    assert json.dumps(rendered).replace("gebpfgk-0a1b2c3d", SANDBOX_ID).replace(
        "km-artifacts-123456789012", BUCKET
    ) == json.dumps(policy)


def test_rendered_policy_fits_an_inline_role_policy(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["identity"]["allowedRegions"] = ["us-east-1", "us-east-2", "us-west-2", "eu-west-1"]
        spec["identity"]["allowedSecretPaths"] = [f"/km/goose/secret-{n}" for n in range(10)]

    rendered = render_iam_policy(iam_policy(goose_variant(tmp_path, edit)), "abcdefghijkl-0a1b2c3d", "b" * 63)
    # IAM's limit for all inline policies of a role, whitespace excluded.
    assert len(json.dumps(rendered, separators=(",", ":"))) <= 10_240


def test_compiled_plan_carries_the_same_policy(tmp_path: Path) -> None:
    profile = goose_variant(tmp_path)
    compiled = compile_profile(profile)
    assert compiled.iam_policy == compiled.plan["iamPolicy"] == iam_policy(profile)
    assert json.loads(compiled.files()["iam-policy.json"]) == iam_policy(profile)
