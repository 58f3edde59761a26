"""Real local sandboxes for tests: root only, a private state and sandbox directory per session.

Images are baked once into the shared image store (/var/lib/km/images, or KM_IMAGE_DIR) and reused,
because a bake takes minutes; everything else a test makes lives under pytest's temporary directory.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.images.bake import bake
from controller.images.store import Image
from tests.sandbox.world import World, fake_internet

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (nspawn, network namespaces, mounts): run as root, as CI does")
    root = tmp_path_factory.mktemp("km-local")
    saved = {key: os.environ.get(key) for key in ("KM_STATE_DIR", "KM_SANDBOX_DIR", "KM_SUBSTRATE")}
    os.environ["KM_STATE_DIR"] = str(root / "state")
    os.environ["KM_SANDBOX_DIR"] = str(root / "sandboxes")
    os.environ.pop("KM_SUBSTRATE", None)
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def debian_image(local_env: Path) -> Image:
    return bake("debian-12")[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, local_env: Path) -> Iterator[World]:
    """The fake internet (tests/sandbox/world.py), one per test module that asks for it."""
    with fake_internet(tmp_path_factory.mktemp("world")) as found:
        yield found


def leftovers(sandbox_id: str) -> list[str]:
    """Everything a local sandbox may leave on the host, as far as the host can tell."""
    found = []
    suffix = sandbox_id.rsplit("-", 1)[-1]
    if Path(f"/run/netns/km-{sandbox_id}").exists():
        found.append("network namespace")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    if f"kmv-{suffix}" in links:
        found.append("veth")
    rules = subprocess.run(["nft", "list", "table", "ip", "km"], capture_output=True, text=True).stdout
    if f"km:{sandbox_id}" in rules:
        found.append("nat rule")
    for hierarchy in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
        if Path(hierarchy, f"km-nspawn-{sandbox_id}").exists():
            found.append(f"cgroup in {hierarchy}")
    if sandbox_id in Path("/proc/self/mounts").read_text():
        found.append("mount")
    processes = subprocess.run(["pgrep", "-f", "--", f"--machine={sandbox_id}"], capture_output=True, text=True).stdout
    if processes.strip():
        found.append("nspawn process")
    sandboxes = Path(os.environ["KM_SANDBOX_DIR"])
    if (sandboxes / sandbox_id).exists():
        found.append("sandbox directory")
    return found
