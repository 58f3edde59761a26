"""Block devices and mount points: the additional volume's device, and that the boot script mounts it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import choose_additional_device, compile_profile
from controller.compiler.volumes import plan_volumes
from controller.profile import BUILTIN_PROFILES_DIR, ProfileError, load_profile
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
ALL_CANDIDATES = [f"/dev/sd{letter}" for letter in "fghijklmnop"]


@pytest.mark.parametrize(
    ("mapped", "expected"),
    [
        ([], "/dev/sdf"),
        (["/dev/xvda"], "/dev/sdf"),
        (["/dev/sda1"], "/dev/sdf"),
        (["/dev/sdf"], "/dev/sdg"),
        (["/dev/xvdf"], "/dev/sdg"),
        (["/dev/sdf1"], "/dev/sdg"),
        (["/dev/xvdf", "/dev/sdg"], "/dev/sdh"),
        (["/dev/sda1", "/dev/sdf", "/dev/sdg"], "/dev/sdh"),
        (["/dev/xvda", "/dev/sdg"], "/dev/sdf"),
        ([" /dev/sdf "], "/dev/sdg"),
        (["/dev/sdb", "/dev/sdc", "/dev/sdd", "/dev/sde"], "/dev/sdf"),
        (ALL_CANDIDATES[:-1], "/dev/sdp"),
        ([f"/dev/xvd{letter}" for letter in "fghijklmno"], "/dev/sdp"),
        # Names that are not /dev/sdX or /dev/xvdX do not claim a slot.
        (["/dev/nvme1n1", "sdf", "/dev/xvdba"], "/dev/sdf"),
    ],
    ids=lambda value: ",".join(value) if isinstance(value, list) else value,
)
def test_choose_additional_device(mapped: list[str], expected: str) -> None:
    assert choose_additional_device(mapped) == expected


@pytest.mark.parametrize(
    "mapped",
    [
        ALL_CANDIDATES,
        [f"/dev/xvd{letter}" for letter in "fghijklmnop"],
        ["/dev/xvda", *ALL_CANDIDATES[:5], *(f"/dev/xvd{letter}1" for letter in "klmnop")],
    ],
    ids=["sd", "xvd", "mixed-with-partitions"],
)
def test_every_candidate_taken_is_an_error_at_the_additional_volume(mapped: list[str]) -> None:
    with pytest.raises(ProfileError) as raised:
        choose_additional_device(mapped)
    (finding,) = raised.value.findings
    assert finding.path == ("spec", "runtime", "additionalVolume")
    assert "spec.runtime.additionalVolume" in str(raised.value)
    assert "/dev/sdf" in finding.message and "/dev/sdp" in finding.message


def test_the_device_choice_accepts_any_iterable() -> None:
    assert choose_additional_device(name for name in ["/dev/sdf", "/dev/sdg"]) == "/dev/sdh"


def test_goose_volumes() -> None:
    profile, _ = load_profile(GOOSE_FILE)
    volumes = [volume.as_json() for volume in plan_volumes(profile, "amazon-linux-2023")]
    assert volumes == [
        # goose hibernates, and a hibernating root volume must be encrypted.
        {"device": "/dev/xvda", "mountPoint": "/", "sizeGiB": 15, "kind": "root", "encrypted": True},
        {"device": "/dev/sdf", "mountPoint": "/data", "sizeGiB": 20, "kind": "ebs", "encrypted": False},
        {"device": None, "mountPoint": "/shared", "sizeGiB": None, "kind": "efs", "encrypted": False},
    ]


@pytest.mark.parametrize(
    ("ami", "root_device"),
    [
        ("amazon-linux-2023", "/dev/xvda"),
        ("debian-12", "/dev/xvda"),
        ("ubuntu-24.04", "/dev/sda1"),
        ("ubuntu-22.04", "/dev/sda1"),
    ],
)
def test_root_device_follows_the_image(tmp_path: Path, ami: str, root_device: str) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["runtime"]["ami"] = ami

    profile = goose_variant(tmp_path, edit)
    plan = compile_profile(profile)
    assert plan.plan["sandbox"]["ami"] == ami
    assert plan.plan["volumes"][0] == {"device": root_device, "mountPoint": "/", "sizeGiB": 15, "kind": "root", "encrypted": True}


def test_no_additional_volume_and_no_efs_leaves_only_the_root(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        del spec["runtime"]["additionalVolume"]
        spec["runtime"]["mountEFS"] = False
        spec["runtime"]["rootVolumeSize"] = 0
        spec["runtime"]["hibernation"] = False

    profile = goose_variant(tmp_path, edit)
    # Every candidate device is taken, but no additional volume is asked for: not an error.
    volumes = plan_volumes(profile, "amazon-linux-2023", ALL_CANDIDATES)
    assert [volume.as_json() for volume in volumes] == [
        {"device": "/dev/xvda", "mountPoint": "/", "sizeGiB": None, "kind": "root", "encrypted": False},
    ]
    userdata = compile_profile(profile, ALL_CANDIDATES).userdata
    assert "km_mount_volume" not in userdata and "km_mount_efs" not in userdata


def test_encrypted_additional_volume(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["runtime"]["additionalVolume"] = {"size": 100, "mountPoint": "/scratch", "encrypted": True}

    profile = goose_variant(tmp_path, edit)
    (extra,) = [volume for volume in plan_volumes(profile, "amazon-linux-2023") if volume.kind == "ebs"]
    assert (extra.device, extra.mount_point, extra.size_gib, extra.encrypted) == ("/dev/sdf", "/scratch", 100, True)


def test_userdata_mounts_the_device_that_was_chosen() -> None:
    """The original tool moved the volume to the next free device but still mounted /dev/sdf."""
    profile, _ = load_profile(GOOSE_FILE)
    compiled = compile_profile(profile, ami_block_device_names=["/dev/xvda", "/dev/sdf"])
    (extra,) = [volume for volume in compiled.plan["volumes"] if volume["kind"] == "ebs"]
    assert extra["device"] == "/dev/sdg"
    assert extra["mountPoint"] == "/data"
    mounts = re.findall(r"^km_mount_volume .*$", compiled.userdata, re.MULTILINE)
    assert mounts == ["km_mount_volume /dev/sdg /data"]
    assert "km_mount_volume /dev/sdf" not in compiled.userdata


@pytest.mark.parametrize(
    ("mapped", "device"),
    [([], "/dev/sdf"), (["/dev/xvdf", "/dev/xvdg", "/dev/xvdh"], "/dev/sdi"), (ALL_CANDIDATES[:-1], "/dev/sdp")],
)
def test_plan_and_userdata_agree_on_the_device(mapped: list[str], device: str) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    compiled = compile_profile(profile, mapped)
    planned = [volume["device"] for volume in compiled.plan["volumes"] if volume["kind"] == "ebs"]
    mounted = re.findall(r"^km_mount_volume (\S+) /data$", compiled.userdata, re.MULTILINE)
    assert planned == mounted == [device]


def test_compiling_with_every_device_taken_is_a_profile_error() -> None:
    profile, _ = load_profile(GOOSE_FILE)
    with pytest.raises(ProfileError) as raised:
        compile_profile(profile, ALL_CANDIDATES)
    assert [finding.dotted_path for finding in raised.value.findings] == ["spec.runtime.additionalVolume"]
