"""TTL and idle enforcement for local sandboxes, on real sandboxes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.images.store import Image
from controller.sandboxes import state_store
from controller.substrates.local.reaper import reap_once, reaper_pid_file, reaper_running
from controller.substrates.local.substrate import LocalSubstrate
from tests.sandbox.conftest import leftovers
from tests.sandbox.test_local_lifecycle import KM, PROFILE, km

pytestmark = pytest.mark.root


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    file = tmp_path / "reap.yaml"
    file.write_text(PROFILE.replace('    initCommands:\n      - "echo first-boot > /var/lib/km/init-ran"\n', ""))
    return file


def create(profile_file: Path, alias: str, policy: str = "destroy", stop_reaper: bool = True) -> str:
    profile_file.write_text(profile_file.read_text().replace("teardownPolicy: destroy", f"teardownPolicy: {policy}"))
    sandbox_id = str(json.loads(km("create", str(profile_file), "--alias", alias, "--json").stdout)["sandbox"]["id"])
    if stop_reaper:  # tests that drive reap_once themselves: the reaper km started would race them
        stop_background_reaper()
    return sandbox_id


def stop_background_reaper() -> None:
    pid_file = reaper_pid_file()
    deadline = time.monotonic() + 20
    while not reaper_running(pid_file) and time.monotonic() < deadline:
        time.sleep(0.05)  # km create started it; it takes its lock a moment later
    if reaper_running(pid_file):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while reaper_running(pid_file) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.parametrize(("policy", "locked", "expected"), [("destroy", False, "gone"), ("stop", False, "stopped"),
                                                            ("retain", False, "running"), ("destroy", True, "running")])  # fmt: skip
def test_an_expired_ttl_applies_the_teardown_policy(
    local_env: Path, debian_image: Image, profile_file: Path, policy: str, locked: bool, expected: str
) -> None:
    sandbox_id = create(profile_file, f"ttl-{policy}", policy)
    store = state_store()
    try:
        store.update(sandbox_id, ttl_expiry=datetime.now(UTC) - timedelta(seconds=1), locked=locked)
        done = reap_once(LocalSubstrate(store))
        remaining = {record.sandbox_id: LocalSubstrate(store).observe(record) for record in store.list()}
        assert remaining.get(sandbox_id, "gone") == expected
        assert bool(done) == (expected != "running")
        if expected == "gone":
            assert leftovers(sandbox_id) == []
    finally:
        store.update(sandbox_id, locked=False) if sandbox_id in {r.sandbox_id for r in store.list()} else None
        km("destroy", sandbox_id, "--yes", check=False)


def test_idle_timeout_counts_from_the_last_activity_in_the_agent_slice(
    local_env: Path, debian_image: Image, profile_file: Path
) -> None:
    sandbox_id = create(profile_file, "idle")
    store = state_store()
    substrate = LocalSubstrate(store)
    busy = subprocess.Popen([KM, "shell", "idle", "--", "sleep", "5"])
    try:
        time.sleep(2)
        later = datetime.now(UTC) + timedelta(hours=1)
        assert reap_once(substrate, now=later) == []  # busy: an agent-slice process counts as activity
        assert store.get(sandbox_id).resources["last_active"] == later.isoformat()
        assert busy.wait(timeout=60) == 0  # the agent-slice process has finished
        time.sleep(0.5)
        assert reap_once(substrate, now=later + timedelta(minutes=29)) == []
        (done,) = reap_once(substrate, now=later + timedelta(minutes=31))
        assert "idle for 30 minutes; destroy applied" in done
        assert leftovers(sandbox_id) == []
    finally:
        busy.kill()
        km("destroy", sandbox_id, "--yes", check=False)


def test_create_starts_one_reaper_which_exits_when_no_sandbox_is_left(
    local_env: Path, debian_image: Image, profile_file: Path
) -> None:
    sandbox_id = create(profile_file, "reaped", stop_reaper=False)
    try:
        deadline = time.monotonic() + 20
        while not reaper_running() and time.monotonic() < deadline:
            time.sleep(0.2)  # it is a Python process that needs a moment to take its lock
        assert reaper_running()
    finally:
        km("destroy", sandbox_id, "--yes", check=False)
    deadline = time.monotonic() + 20
    while reaper_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not reaper_running()
