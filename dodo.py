"""km's task graph. Thin by design: each task only wires doit to one controller function.

    doit list                              every task
    doit compile:goose                     build/goose/{plan.json,userdata.sh,iam-policy.json,host-agent.json}
    doit bake:debian-12                    the local image (up to date while an image with its hash exists)
    doit create:goose --substrate local    converge the sandbox aliased goose to the profile (same as km create)
    doit destroy:goose                     remove it

doit's own dependency file is a cache (json backend, `.doit.json`); the truth about sandboxes and
images lives in the cloud or the local state database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from controller.compiler import PLAN_FILES, compile_reference
from controller.converge import SandboxBusy
from controller.images.bake import bake
from controller.images.chroot import BakeError
from controller.images.recipe import load_recipe, recipe_names
from controller.images.store import ImageStore
from controller.profile import ProfileError, ProfileResolver
from controller.profile.catalog import builtin_profiles
from controller.state import StateError
from controller.substrates.local.machine import MachineError
from controller.substrates.local.network import NetworkError
from controller.substrates.local.substrate import SubstrateError

BUILD_DIR = Path("build")
COMPILER_SOURCES = sorted(
    str(path) for package in ("controller/compiler", "controller/profile") for path in Path(package).glob("*.py")
) + ["host_agent/config.py", "host_agent/systemd/km-host-agent.service"]

BUILTIN = builtin_profiles()  # read once: every task family below is generated from it
DOIT_CONFIG = {"dep_file": ".doit.json", "backend": "json", "verbosity": 2, "default_tasks": ["compile"]}
OPERATOR_ERRORS = (ProfileError, SubstrateError, MachineError, NetworkError, StateError, BakeError, SandboxBusy)


def _compile(name: str) -> TaskFailed | None:
    try:
        result = compile_reference(name, BUILD_DIR / name)
    except ProfileError as error:
        return TaskFailed("\n".join(str(finding) for finding in error.findings))
    print(f"{result.name}: {result.directory} (plan {result.hash[:12]})")
    return None


def _profile_files(resolver: ProfileResolver, name: str, fallback: Path) -> list[str]:
    """The profile and every file it extends; a broken ancestry still yields a task that reports it."""
    try:
        return [str(path) for path in resolver.load(name).files]
    except ProfileError:
        return [str(fallback)]


def task_compile() -> Iterator[dict[str, Any]]:
    """Compile a built-in profile into build/<name>/."""
    resolver = ProfileResolver()
    for entry in BUILTIN:
        if entry.abstract:
            continue
        yield {
            "name": entry.name,
            "actions": [(_compile, [entry.name])],
            "file_dep": _profile_files(resolver, entry.name, entry.file) + COMPILER_SOURCES,
            "targets": [str(BUILD_DIR / entry.name / file) for file in PLAN_FILES],
            "clean": True,
        }


def _failure(error: Exception) -> TaskFailed:
    if isinstance(error, ProfileError):
        return TaskFailed("\n".join(str(finding) for finding in error.findings))
    return TaskFailed(str(error))


def _image_is_current(name: str) -> bool:
    try:
        return ImageStore().find(load_recipe(name).image_name) is not None
    except ProfileError:
        return False


def _bake(name: str) -> TaskFailed | None:
    try:
        image, baked = bake(name, progress=print)
    except OPERATOR_ERRORS as error:
        return _failure(error)
    print(f"{name}: {image.directory}" + ("" if baked else " (already baked)"))
    return None


def task_bake() -> Iterator[dict[str, Any]]:
    """Bake a local image from amis/<recipe>.yaml."""
    for name in recipe_names():
        yield {"name": name, "actions": [(_bake, [name])], "uptodate": [lambda name=name: _image_is_current(name)]}


def _create(name: str, substrate: str | None, alias: str | None, dry_run: bool) -> TaskFailed | None:
    from controller.sandboxes import converge

    try:
        result = converge(name, alias=alias, substrate=substrate, dry_run=dry_run, progress=print)
    except OPERATOR_ERRORS as error:
        return _failure(error)
    print(("would " if dry_run and result.convergence.action != "none" else "") + result.convergence.describe(result.alias))
    return None


CREATE_PARAMS = [
    {"name": "substrate", "long": "substrate", "type": str, "default": None, "help": "local or ec2 (default: KM_SUBSTRATE)"},
    {"name": "alias", "long": "alias", "type": str, "default": None, "help": "sandbox alias (default: the profile name)"},
    {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "say what would happen"},
]


def task_create() -> Iterator[dict[str, Any]]:
    """Converge the sandbox named after a profile to its plan (create, update in place, or replace)."""
    for entry in BUILTIN:
        if not entry.abstract:
            yield {
                "name": entry.name,
                "actions": [(_create, [entry.name])],
                "task_dep": [f"compile:{entry.name}"],  # build/<name>/ shows what the sandbox is converged to
                "params": CREATE_PARAMS,
                "uptodate": [False],
            }


def _destroy(alias: str) -> TaskFailed | None:
    from controller.sandboxes import resolve

    try:
        record, substrate = resolve(alias)
        substrate.destroy(record)
    except OPERATOR_ERRORS as error:
        return _failure(error)
    print(f"{alias}: destroyed ({record.sandbox_id})")
    return None


def task_destroy() -> Iterator[dict[str, Any]]:
    """Destroy the sandbox aliased after a profile."""
    for entry in BUILTIN:
        if not entry.abstract:
            yield {"name": entry.name, "actions": [(_destroy, [entry.name])], "uptodate": [False]}
