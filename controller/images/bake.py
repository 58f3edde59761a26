"""Bake a local image from a recipe: debootstrap (or the parent image), packages, files, trust,
the BPF objects and the host agent, units. Up to date when an image with the recipe's hash is in the store.

Every step logs to `bake.log` in the partial directory; a failure removes the partial directory and
keeps its log as `<store>/.failed-<image>.log`, named in the error.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from controller.images.chroot import BakeError, run_in_chroot, run_logged
from controller.images.recipe import RECIPES_DIR, LoadedRecipe, load_recipe, sandbox_requirements
from controller.images.store import Image, ImageStore
from ebpf.objects import ObjectError, build_all
from host_agent.version import __version__

Progress = Callable[[str], None]
REPO_ROOT = Path(__file__).resolve().parents[2]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_AGENT_VENV = "/opt/km/venv"
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def bake(
    name: str, store: ImageStore | None = None, progress: Progress = lambda _: None, recipes_dir: Path = RECIPES_DIR
) -> tuple[Image, bool]:
    """The image for recipe `name`, baking it (and its parents) if needed; the flag says whether it was baked."""
    store = store or ImageStore()
    recipe = load_recipe(name, recipes_dir)
    existing = store.find(recipe.image_name)
    if existing is not None:
        return existing, False
    _require_bake_tools()
    parent_image = bake(recipe.parent.name, store, progress, recipes_dir)[0] if recipe.parent else None
    store.remove_stale_partials()
    partial = store.partial_dir(recipe.image_name)
    partial.mkdir()
    log_file = partial / "bake.log"
    try:
        _build(recipe, parent_image, partial / "rootfs", log_file, progress)
        metadata = {
            "recipe": recipe.name,
            "hash": recipe.hash,
            "km_version": __version__,
            "parent": parent_image.name if parent_image else None,
            "packages": list(recipe.recipe.spec.packages),
        }
        image = store.commit(partial, recipe.image_name, metadata)
    except BaseException:
        if log_file.exists():
            shutil.copyfile(log_file, store.root / f".failed-{recipe.image_name}.log")
        shutil.rmtree(partial, ignore_errors=True)
        raise
    progress(f"bake {name}: ready at {image.directory}")
    return image, True


def _require_bake_tools() -> None:
    if os.geteuid() != 0:
        raise BakeError("baking an image needs root (debootstrap, chroot, mounts); run as root")
    missing = [tool for tool in ("debootstrap", "unshare", "chroot") if shutil.which(tool) is None]
    if missing:
        raise BakeError(f"missing {', '.join(missing)}: run `bash scripts/setup.sh` as root to install them")


def _build(recipe: LoadedRecipe, parent: Image | None, rootfs: Path, log_file: Path, progress: Progress) -> None:
    spec = recipe.recipe.spec
    name = recipe.name
    if parent is not None:
        progress(f"bake {name}: copying parent image {parent.name}")
        run_logged(["cp", "-a", "--reflink=auto", str(parent.rootfs), str(rootfs)], "copying the parent image", log_file)
    else:
        assert spec.base is not None
        progress(f"bake {name}: debootstrap {spec.base.suite} (about a minute)")
        run_logged(
            ["debootstrap", "--variant=minbase", "--include=ca-certificates", spec.base.suite, str(rootfs), spec.base.mirror],
            "debootstrap",
            log_file,
        )
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf", follow_symlinks=True)
    if spec.packages:
        progress(f"bake {name}: installing {len(spec.packages)} packages")
        packages = " ".join(shlex.quote(p) for p in spec.packages)
        script = f"apt-get update -q && apt-get install -y -q --no-install-recommends {packages} && apt-get clean"
        run_in_chroot(rootfs, script, "installing packages", log_file)
    for image_file in spec.files:
        target = rootfs / image_file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe.source_path(image_file), target)
        target.chmod(int(image_file.mode, 8))
    if spec.trust_host_ca and HOST_CA_BUNDLE.is_file():
        progress(f"bake {name}: trusting the host's CA bundle")
        _trust_host_ca(rootfs, log_file)
    if spec.host_agent:
        progress(f"bake {name}: installing km-host-agent")
        _install_host_agent(rootfs, log_file)
    _finalise(rootfs, spec.units, log_file)


def _trust_host_ca(rootfs: Path, log_file: Path) -> None:
    """Sandboxes reach registries through the same TLS-inspecting proxies as the host, so trust its CAs."""
    target = rootfs / "usr/local/share/ca-certificates/km-host"
    target.mkdir(parents=True, exist_ok=True)
    for index, block in enumerate(_PEM_BLOCK.findall(HOST_CA_BUNDLE.read_text(encoding="utf-8", errors="replace"))):
        (target / f"host-{index:04d}.crt").write_text(block + "\n", encoding="utf-8")
    run_in_chroot(rootfs, "update-ca-certificates >/dev/null", "trusting the host CA bundle", log_file)


def build_bpf_objects() -> None:
    """Compile the BPF objects on this host (clang is here, not in the image)."""
    try:
        build_all()
    except ObjectError as exc:
        raise BakeError(f"building the BPF objects for the image: {exc}") from exc


def _install_host_agent(rootfs: Path, log_file: Path) -> None:
    """km's wheel and the daemon's dependencies, fetched on the host and installed offline in the image."""
    wheels = rootfs / "tmp/km-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build_bpf_objects()  # the wheel carries them: sandboxes load them and never compile
    run_logged([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO_ROOT)], "building the km wheel", log_file)
    requirements = sandbox_requirements()
    run_logged(
        [*pip, "download", "-d", str(wheels), "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
         "--python-version", "3.11", "--implementation", "cp", *requirements],
        "downloading the host agent's dependencies",
        log_file,
    )  # fmt: skip
    quoted = " ".join(shlex.quote(r) for r in requirements)
    script = f"""
python3 -m venv --system-site-packages {HOST_AGENT_VENV}
{HOST_AGENT_VENV}/bin/pip install -q --no-index --find-links /tmp/km-wheels {quoted}
{HOST_AGENT_VENV}/bin/pip install -q --no-index --no-deps /tmp/km-wheels/km-*.whl
ln -sfn {HOST_AGENT_VENV}/bin/km-host-agent /usr/local/bin/km-host-agent
units=$(echo {HOST_AGENT_VENV}/lib/python3*/site-packages/host_agent/systemd)
install -m 0644 $units/*.service $units/*.mount $units/*.slice /etc/systemd/system/
systemctl enable km-host-agent.service
km-host-agent --version
rm -rf /tmp/km-wheels
"""
    run_in_chroot(rootfs, script, "installing km-host-agent", log_file)


def _finalise(rootfs: Path, units: list[str], log_file: Path) -> None:
    """Enable the recipe's units; every clone must boot as a new machine: no machine id, no apt state."""
    enable = f"systemctl enable {' '.join(shlex.quote(u) for u in units)}" if units else ":"
    script = f"""
{enable}
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb
"""
    run_in_chroot(rootfs, script, "finalising the image", log_file)
    subprocess.run(["sync", "-f", str(rootfs)], check=False)
