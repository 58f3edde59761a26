"""testinfra checks of running sandboxes built from profiles: what the profile says is what is there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra

from controller.images.store import Image
from tests.infra.backend import sandbox_host
from tests.sandbox.test_local_lifecycle import PROFILE, km

pytestmark = pytest.mark.root


def _sandbox(tmp_path: Path, alias: str, privileged: bool) -> Iterator[testinfra.host.Host]:
    profile = tmp_path / f"{alias}.yaml"
    text = PROFILE.replace(
        "    workingDir: /workspace\n", f"    workingDir: /workspace\n    privileged: {str(privileged).lower()}\n"
    )
    profile.write_text(text)
    sandbox_id = json.loads(km("create", str(profile), "--alias", alias, "--json").stdout)["sandbox"]["id"]
    try:
        yield sandbox_host(sandbox_id)  # ids are unique; testinfra caches hosts by name
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


@pytest.fixture
def host(local_env: Path, debian_image: Image, tmp_path: Path) -> Iterator[testinfra.host.Host]:
    yield from _sandbox(tmp_path, "infra", privileged=False)


@pytest.fixture
def privileged_host(local_env: Path, debian_image: Image, tmp_path: Path) -> Iterator[testinfra.host.Host]:
    yield from _sandbox(tmp_path, "infra-root", privileged=True)


def test_the_host_agent_unit_is_active_and_enabled(host: testinfra.host.Host) -> None:
    agent = host.service("km-host-agent")
    assert agent.is_running and agent.is_enabled
    assert host.file("/etc/km/host-agent.json").exists


def test_the_sandbox_user_exists_without_sudo(host: testinfra.host.Host) -> None:
    sandbox = host.user("sandbox")
    assert sandbox.exists and sandbox.home == "/home/sandbox" and sandbox.shell == "/bin/bash"
    assert not {"sudo", "wheel", "adm"} & set(sandbox.groups)
    assert not host.file("/etc/sudoers.d/km-sandbox").exists
    assert host.run("sudo -l -U sandbox").stdout.count("may run") == 0


def test_working_dir_env_config_files_and_volumes(host: testinfra.host.Host) -> None:
    workspace = host.file("/workspace")
    assert workspace.is_directory and workspace.user == "sandbox"
    env_file = host.file("/etc/profile.d/km-profile-env.sh")
    assert env_file.contains("GREETING=") and env_file.user == "root"
    assert host.run("bash -lc 'printf %s \"$GREETING\"'").stdout == "hello 'quoted' $world"
    settings = host.file("/home/sandbox/.config/km/settings.json")
    assert settings.content_string == '{"a": 1}' and settings.user == "sandbox"
    assert host.mount_point("/data").exists


def test_privileged_profiles_get_passwordless_sudo(privileged_host: testinfra.host.Host) -> None:
    sudoers = privileged_host.file("/etc/sudoers.d/km-sandbox")
    assert sudoers.exists and sudoers.mode == 0o440
    assert "NOPASSWD: ALL" in privileged_host.run("sudo -l -U sandbox").stdout
