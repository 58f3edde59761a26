"""`km shell REF` on a terminal: a login shell as the sandbox user, driven through a real tmux pane."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from controller.images.store import Image
from tests.sandbox.test_local_lifecycle import KM, PROFILE, km

pytestmark = pytest.mark.root


def test_an_interactive_shell_is_a_login_shell_in_the_agent_slice(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    profile = tmp_path / "tty.yaml"
    profile.write_text(PROFILE)
    sandbox_id = json.loads(km("create", str(profile), "--alias", "tty", "--json").stdout)["sandbox"]["id"]
    socket = f"km-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    environment = " ".join(f"{key}={shlex.quote(os.environ[key])}" for key in ("KM_STATE_DIR", "KM_SANDBOX_DIR"))
    try:
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", "tty", "-x", "120", "-y", "20", f"{environment} {KM} shell tty; sleep 30"],
            check=True,
        )
        deadline = time.monotonic() + 30
        screen = ""
        while "sandbox@tty:/workspace$" not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "tty"], capture_output=True, text=True).stdout
        assert "sandbox@tty:/workspace$" in screen, screen
        subprocess.run(
            [
                *tmux,
                "send-keys",
                "-t",
                "tty",
                'echo "user=$(id -un) greeting=$GREETING"; tail -1 /proc/self/cgroup; tty',
                "Enter",
            ],
            check=True,
        )
        deadline = time.monotonic() + 10
        while "/dev/pts/" not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "tty"], capture_output=True, text=True).stdout
        assert "user=sandbox greeting=hello 'quoted' $world" in screen
        assert "0::/kmagent.slice/" in screen and "/dev/pts/" in screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        km("destroy", sandbox_id, "--yes", check=False)
