"""km doctor --local finds what a lost sandbox left on the host, and --fix removes it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from controller.images.store import Image
from controller.sandboxes import state_store
from tests.sandbox.conftest import leftovers
from tests.sandbox.test_local_lifecycle import PROFILE, km

pytestmark = pytest.mark.root


def test_a_sandbox_whose_record_was_lost_is_found_and_removed(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    profile = tmp_path / "lost.yaml"
    profile.write_text(PROFILE)
    sandbox_id = json.loads(km("create", str(profile), "--alias", "lost", "--json").stdout)["sandbox"]["id"]
    state_store().delete(sandbox_id)  # as if the state file had been lost

    report = km("doctor", "--local", "--json", check=False)
    assert report.returncode == 1
    kinds = {item["kind"] for item in json.loads(report.stdout)["found"] if item["sandbox_id"] in (sandbox_id, sandbox_id[-8:])}
    assert kinds == {"process", "cgroup", "mount", "nft-rule", "veth", "netns", "directory"}

    fixed = km("doctor", "--local", "--fix", "--json", check=False)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    assert leftovers(sandbox_id) == []
    assert km("doctor", "--local").stdout.strip() == "0 leftover(s) found"


def test_hand_made_leftovers_of_every_kind(local_env: Path) -> None:
    sandbox_id = "zz-0badc0de"
    subprocess.run(["ip", "netns", "add", f"km-{sandbox_id}"], check=True)
    subprocess.run(["ip", "link", "add", "kmv-0badc0de", "type", "veth", "peer", "name", "kmp-0badc0de"], check=True)
    Path(
        "/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup", f"km-nspawn-{sandbox_id}"
    ).mkdir()
    (Path(os.environ["KM_SANDBOX_DIR"]) / sandbox_id).mkdir(parents=True)
    found = json.loads(km("doctor", "--local", "--json", check=False).stdout)["found"]
    assert {item["kind"] for item in found} >= {"netns", "veth", "cgroup", "directory"}
    assert km("doctor", "--local", "--fix", check=False).returncode == 0
    assert leftovers(sandbox_id) == []
    assert "kmv-0badc0de" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
