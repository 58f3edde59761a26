"""Faults: killed creates, interrupted creates, a failing bake, no root. Nothing is left half-made."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from controller.images.bake import bake
from controller.images.chroot import BakeError
from controller.images.recipe import RECIPES_DIR
from controller.images.store import Image, ImageStore
from tests.sandbox.conftest import leftovers
from tests.sandbox.test_local_lifecycle import KM, PROFILE, km

pytestmark = pytest.mark.root
SLOW_FIRST_BOOT = PROFILE.replace('"echo first-boot > /var/lib/km/init-ran"', '"sleep 6"')


def _start_create(profile: Path, alias: str) -> tuple[subprocess.Popen[str], str]:
    """Start `km create` and return once its machine is booting (record written, nspawn running)."""
    process = subprocess.Popen(
        [KM, "create", str(profile), "--alias", alias], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = json.loads(km("list", "--json").stdout)
        booting = [s for s in listed if s["alias"] == alias and s["resources"].get("slot")]
        if (
            booting
            and subprocess.run(["pgrep", "-f", "--", f"--machine={booting[0]['id']}"], capture_output=True).returncode == 0
        ):
            return process, str(booting[0]["id"])
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the create never started booting")


def test_a_killed_create_is_replaced_by_the_next_run(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    profile = tmp_path / "slow.yaml"
    profile.write_text(SLOW_FIRST_BOOT)
    process, killed_id = _start_create(profile, "killed")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    rerun = km("create", str(profile), "--alias", "killed")
    try:
        assert "killed: replace: the existing sandbox is starting" in rerun.stdout + rerun.stderr
        listed = json.loads(km("list", "--json").stdout)
        assert [(s["alias"], s["status"]) for s in listed] == [("killed", "running")]
        assert listed[0]["id"] != killed_id
        assert leftovers(killed_id) == []
    finally:
        for sandbox in json.loads(km("list", "--json").stdout):
            km("destroy", sandbox["id"], "--yes", check=False)


def test_an_interrupted_create_removes_what_it_made(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    profile = tmp_path / "slow.yaml"
    profile.write_text(SLOW_FIRST_BOOT)
    process, sandbox_id = _start_create(profile, "interrupted")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert json.loads(km("list", "--json").stdout) == []
    assert leftovers(sandbox_id) == []


def test_without_root_the_error_is_one_clear_line(local_env: Path, tmp_path: Path) -> None:
    readable = Path(tempfile.mkdtemp(prefix="km-nobody-"))
    readable.chmod(0o755)
    (readable / "p.yaml").write_text(PROFILE)
    (readable / "p.yaml").chmod(0o644)
    unreadable = tmp_path / "p.yaml"  # pytest's temporary directories are private to root
    unreadable.write_text(PROFILE)
    env = {**os.environ, "HOME": str(readable), "KM_STATE_DIR": str(readable / "state")}
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", KM, "create"]
    try:
        for profile, words in ((readable / "p.yaml", "needs root"), (unreadable, "Permission denied")):
            result = subprocess.run([*as_nobody, str(profile)], capture_output=True, text=True, env=env, timeout=60)
            assert result.returncode == 1
            assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    finally:
        shutil.rmtree(readable)


def test_a_failed_bake_leaves_no_image_that_looks_complete(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    recipes = tmp_path / "amis"
    shutil.copytree(RECIPES_DIR, recipes)
    (recipes / "broken.yaml").write_text(
        "apiVersion: klankermaker.ai/v1alpha1\nkind: ImageRecipe\nmetadata: {name: broken}\n"
        "spec:\n  parent: debian-12\n  trustHostCA: false\n  files:\n    - {path: /etc, source: files/yum-apt.sh}\n"
    )
    store = ImageStore()
    before = {path.name for path in store.root.iterdir()}
    with pytest.raises((BakeError, OSError)):
        bake("broken", store, recipes_dir=recipes)
    after = {path.name for path in store.root.iterdir()}
    new = after - before
    assert all(name.startswith(".failed-broken-") for name in new), new
    assert not any(image.recipe == "broken" for image in store.images())
    for name in new:
        (store.root / name).unlink()
