"""The compiled plan: golden files for the reference profile, content hashes, and quiet rewrites.

Set KM_UPDATE_GOLDEN=1 to rewrite the golden files from the current compiler (then review the diff).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import PLAN_FILES, compile_profile, compile_reference, write_plan
from controller.profile import BUILTIN_PROFILES_DIR, ProfileError, load_profile
from controller.profile.catalog import builtin_profiles
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
GOLDEN_DIR = Path(__file__).parent / "golden" / "goose"
ABSTRACT = [entry.name for entry in builtin_profiles() if entry.abstract]
CREATABLE = [entry.name for entry in builtin_profiles() if not entry.abstract]
PLAN_KEYS = ["profile", "sandbox", "securityGroup", "iamPolicy", "volumes", "hostAgent", "hash", "hashes"]


def test_goose_matches_the_golden_files() -> None:
    profile, _ = load_profile(GOOSE_FILE)
    files = compile_profile(profile).files()
    assert sorted(files) == sorted(PLAN_FILES) == sorted(["plan.json", "userdata.sh", "iam-policy.json", "host-agent.json"])
    if os.environ.get("KM_UPDATE_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (GOLDEN_DIR / name).write_bytes(content.encode("utf-8"))
        pytest.skip(f"KM_UPDATE_GOLDEN=1: rewrote {', '.join(sorted(files))} in {GOLDEN_DIR}; review the diff")
    for name, content in files.items():
        golden = GOLDEN_DIR / name
        assert golden.is_file(), f"{golden} is missing; run with KM_UPDATE_GOLDEN=1 to create it"
        assert content.encode("utf-8") == golden.read_bytes(), (
            f"{name} differs from {golden}; if intended, rerun with KM_UPDATE_GOLDEN=1"
        )


def test_golden_plan_says_what_the_reference_profile_says() -> None:
    """Guards the golden files themselves, so a bad update cannot hide behind KM_UPDATE_GOLDEN."""
    plan = json.loads((GOLDEN_DIR / "plan.json").read_text(encoding="utf-8"))
    assert list(plan) == PLAN_KEYS
    assert plan["sandbox"] == {
        "prefix": "gebpfgk",
        "substrate": "ec2",
        "region": "us-east-1",
        "instanceType": "t3.medium",
        "ami": "amazon-linux-2023",
    }
    assert plan["profile"]["metadata"]["name"] == "goose"
    assert set(plan["hashes"]) == {"runtime", "policy"}
    assert [volume["mountPoint"] for volume in plan["volumes"]] == ["/", "/data", "/shared"]
    assert plan["volumes"][1]["device"] == "/dev/sdf"
    assert plan["iamPolicy"] == json.loads((GOLDEN_DIR / "iam-policy.json").read_text(encoding="utf-8"))
    assert plan["hostAgent"] == json.loads((GOLDEN_DIR / "host-agent.json").read_text(encoding="utf-8"))
    userdata = (GOLDEN_DIR / "userdata.sh").read_text(encoding="utf-8")
    assert userdata.startswith("#!/bin/bash\n# km first-boot script for profile goose.")
    assert "km_mount_volume /dev/sdf /data" in userdata and "km_mount_efs /shared" in userdata


def test_plan_keys_and_sandbox(tmp_path: Path) -> None:
    compiled = compile_profile(goose_variant(tmp_path))
    assert list(compiled.plan) == PLAN_KEYS
    assert compiled.name == "goose"
    assert compiled.hash == compiled.plan["hash"]
    assert all(len(value) == 64 and int(value, 16) >= 0 for value in (compiled.hash, *compiled.plan["hashes"].values()))
    assert compiled.plan["profile"]["spec"]["runtime"]["instanceType"] == "t3.medium"


def test_the_same_profile_always_gives_the_same_plan(tmp_path: Path) -> None:
    first = compile_profile(goose_variant(tmp_path))
    second = compile_profile(load_profile(GOOSE_FILE)[0])
    assert first.files() == second.files()
    assert (first.hash, first.plan["hashes"]) == (second.hash, second.plan["hashes"])


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def edit(spec: dict[str, Any]) -> None:
        container = spec
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "runtime_changes", "policy_changes"),
    [
        # Live policy: a running sandbox takes these through host-agent.json.
        (_set("budget", "compute", "maxSpendUSD", 0.75), False, True),
        (_set("budget", "ai", "maxSpendUSD", 2.0), False, True),
        (_set("lifecycle", "ttl", "8h"), False, True),
        (_set("network", "egress", "allowedHosts", ["api.example.com"]), False, True),
        (_set("observability", "learnMode", True), False, True),
        # The machine's shape: only a new sandbox has it.
        (_set("runtime", "instanceType", "t3.large"), True, False),
        (_set("runtime", "rootVolumeSize", 30), True, False),
        (_set("runtime", "additionalVolume", "size", 40), True, False),
        (_set("execution", "initCommands", ["dnf install -y git"]), True, False),
        # Live too: the host agent rewrites the environment file and the config files.
        (_set("execution", "env", {"GOOSE_PROVIDER": "anthropic"}), False, True),
        (_set("execution", "configFiles", {"/home/sandbox/x.txt": "x\n"}), False, True),
    ],
    ids=[
        "compute-budget",
        "ai-budget",
        "ttl",
        "allowed-hosts",
        "learn-mode",
        "instance-type",
        "root-volume",
        "data-volume",
        "init-commands",
        "env",
        "config-files",
    ],
)
def test_hashes_separate_runtime_from_policy(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], runtime_changes: bool, policy_changes: bool
) -> None:
    base = compile_profile(goose_variant(tmp_path))
    changed = compile_profile(goose_variant(tmp_path, edit))
    assert (changed.plan["hashes"]["runtime"] != base.plan["hashes"]["runtime"]) == runtime_changes
    assert (changed.plan["hashes"]["policy"] != base.plan["hashes"]["policy"]) == policy_changes
    assert changed.hash != base.hash


def test_device_choice_is_part_of_the_runtime_hash(tmp_path: Path) -> None:
    profile = goose_variant(tmp_path)
    base, moved = compile_profile(profile), compile_profile(profile, ["/dev/sdf"])
    assert moved.plan["hashes"]["runtime"] != base.plan["hashes"]["runtime"]
    assert moved.plan["hashes"]["policy"] == base.plan["hashes"]["policy"]
    assert moved.hash != base.hash


def test_write_plan_writes_the_four_files(tmp_path: Path) -> None:
    compiled = compile_profile(goose_variant(tmp_path))
    out_dir = tmp_path / "build" / "goose"
    changed = write_plan(compiled, out_dir)
    assert sorted(changed) == sorted(out_dir / name for name in PLAN_FILES)
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(PLAN_FILES)
    for name, content in compiled.files().items():
        assert (out_dir / name).read_bytes() == content.encode("utf-8")
    assert stat.S_IMODE((out_dir / "userdata.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out_dir / "plan.json").stat().st_mode) == 0o644


def test_write_plan_leaves_unchanged_files_untouched(tmp_path: Path) -> None:
    compiled = compile_profile(goose_variant(tmp_path))
    out_dir = tmp_path / "goose"
    write_plan(compiled, out_dir)
    old = os.stat(out_dir).st_mtime_ns - 10_000_000_000
    for name in PLAN_FILES:
        os.utime(out_dir / name, ns=(old, old))
    inodes = {name: (out_dir / name).stat().st_ino for name in PLAN_FILES}
    assert write_plan(compiled, out_dir) == []
    assert {name: (out_dir / name).stat().st_mtime_ns for name in PLAN_FILES} == dict.fromkeys(PLAN_FILES, old)
    assert {name: (out_dir / name).stat().st_ino for name in PLAN_FILES} == inodes
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(PLAN_FILES)


def test_write_plan_rewrites_only_what_changed(tmp_path: Path) -> None:
    out_dir = tmp_path / "goose"
    write_plan(compile_profile(goose_variant(tmp_path)), out_dir)
    (out_dir / "iam-policy.json").write_text("edited by hand\n", encoding="utf-8")
    # A budget is policy: host-agent.json, the plan and the boot script (which embeds the config) change.
    updated = compile_profile(goose_variant(tmp_path, _set("budget", "ai", "maxSpendUSD", 3.0)))
    changed = write_plan(updated, out_dir)
    assert sorted(path.name for path in changed) == ["host-agent.json", "iam-policy.json", "plan.json", "userdata.sh"]
    assert write_plan(updated, out_dir) == []
    (out_dir / "plan.json").unlink()
    assert write_plan(updated, out_dir) == [out_dir / "plan.json"]
    assert (out_dir / "iam-policy.json").read_text(encoding="utf-8") == updated.files()["iam-policy.json"]


def test_write_plan_is_quiet_when_content_has_carriage_returns(tmp_path: Path) -> None:
    files = {"/etc/km-test/crlf.txt": "windows\r\nline endings\r\n", "/etc/km-test/cr.txt": "old mac\rline\r"}
    compiled = compile_profile(goose_variant(tmp_path, _set("execution", "configFiles", files)))
    out_dir = tmp_path / "goose"
    assert len(write_plan(compiled, out_dir)) == len(PLAN_FILES)
    assert write_plan(compiled, out_dir) == []


def test_control_characters_never_reach_plan_files_through_paths(validate_text: Any, goose_data: dict[str, Any]) -> None:
    goose_data["spec"]["execution"]["configFiles"] = {"/etc/km-test/a\rb": "x\n"}
    (error,) = validate_text(goose_data).errors
    assert "control characters" in error.message


def test_compile_reference_writes_build_name_under_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = compile_reference("goose")
    assert (result.name, result.directory) == ("goose", Path("build") / "goose")
    assert sorted(path.name for path in (tmp_path / "build" / "goose").iterdir()) == sorted(PLAN_FILES)
    assert sorted(result.changed) == sorted(Path("build") / "goose" / name for name in PLAN_FILES)
    assert result.hash == compile_profile(load_profile("goose")[0]).hash
    assert compile_reference("goose").changed == []


def test_compile_reference_to_an_explicit_directory(tmp_path: Path) -> None:
    result = compile_reference(str(GOOSE_FILE), out_dir=tmp_path / "elsewhere", ami_block_device_names=["/dev/sdf"])
    plan = json.loads((tmp_path / "elsewhere" / "plan.json").read_text(encoding="utf-8"))
    assert plan["volumes"][1]["device"] == "/dev/sdg"
    assert result.hash == plan["hash"]


@pytest.mark.parametrize("name", ABSTRACT)
def test_an_abstract_fragment_cannot_be_compiled(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError) as raised:
        load_profile(name)
    assert [finding.dotted_path for finding in raised.value.findings] == ["metadata.abstract"]
    assert "abstract" in str(raised.value)
    with pytest.raises(ProfileError):
        compile_reference(name)
    assert not (tmp_path / "build").exists()


def test_abstract_fragments_exist() -> None:
    assert {"base/platform", "base/network/locked"} <= set(ABSTRACT)
    assert "goose" in CREATABLE


@pytest.mark.parametrize("name", CREATABLE)
def test_every_builtin_profile_compiles(name: str) -> None:
    compiled = compile_profile(load_profile(name)[0])
    # dodo's targets are build/<file name>/, compile writes build/<metadata.name>/: they must agree.
    assert compiled.name == name
    assert list(compiled.plan) == PLAN_KEYS
    assert json.loads(compiled.files()["plan.json"]) == compiled.plan


@pytest.mark.parametrize("substrate", ["ec2", "local"])
def test_a_profile_without_an_image_gets_amazon_linux_2023_on_every_substrate(tmp_path: Path, substrate: str) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["runtime"]["substrate"] = substrate
        spec["runtime"].pop("ami", None)

    assert compile_profile(goose_variant(tmp_path, edit)).plan["sandbox"]["ami"] == "amazon-linux-2023"
