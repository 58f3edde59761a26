"""km's task graph. Thin by design: each task only wires doit to one controller function.

    doit list                 every task
    doit compile:goose        build/goose/{plan.json,userdata.sh,iam-policy.json,host-agent.json}

doit's own dependency file is a cache (json backend, `.doit.json`); the truth about sandboxes and
images lives in the cloud or the local state database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from controller.compiler import PLAN_FILES, compile_reference
from controller.profile import ProfileError, ProfileResolver
from controller.profile.catalog import builtin_profiles

BUILD_DIR = Path("build")
COMPILER_SOURCES = sorted(
    str(path) for package in ("controller/compiler", "controller/profile") for path in Path(package).glob("*.py")
) + ["host_agent/config.py", "host_agent/systemd/km-host-agent.service"]

DOIT_CONFIG = {"dep_file": ".doit.json", "backend": "json", "verbosity": 2}


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
    for entry in builtin_profiles():
        if entry.abstract:
            continue
        yield {
            "name": entry.name,
            "actions": [(_compile, [entry.name])],
            "file_dep": _profile_files(resolver, entry.name, entry.file) + COMPILER_SOURCES,
            "targets": [str(BUILD_DIR / entry.name / file) for file in PLAN_FILES],
            "clean": True,
        }
