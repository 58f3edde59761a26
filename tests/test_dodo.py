"""The doit task graph, run for real: `doit` in a private copy of the tree, so edits to profiles stay there.

dodo.py works with paths relative to its own directory and finds the built-in profiles next to the
`controller` package it imports, so each test copies dodo.py, controller/, host_agent/ and profiles/
into a temporary directory and runs doit there with that copy first on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.compiler import PLAN_FILES, compile_profile
from controller.profile import ProfileResolver, load_profile
from controller.profile.catalog import builtin_profiles

REPO = Path(__file__).resolve().parents[1]
COPIED = ("controller", "host_agent", "profiles")
EXTENDS_LOCKED = {"claude", "codex", "open-dev", "restricted-dev"}
DOES_NOT_EXTEND_LOCKED = {"goose", "hardened", "sealed"}


def environment(tree: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KM_", "DOIT"))}
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def doit(tree: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", *arguments],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def ran(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Tasks doit executed (`.  name`)."""
    return set(re.findall(r"^\.  (\S+)$", result.stdout, re.MULTILINE))


def up_to_date(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Tasks doit skipped as up to date (`-- name`)."""
    return set(re.findall(r"^-- (\S+)$", result.stdout, re.MULTILINE))


def change_content(path: Path, addition: str = "\n# changed by a test\n") -> None:
    """Change the bytes, not only the time: doit compares checksums of file_dep."""
    path.write_text(path.read_text(encoding="utf-8") + addition, encoding="utf-8")


def mtimes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(directory.iterdir())}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "km"
    root.mkdir()
    shutil.copy2(REPO / "dodo.py", root / "dodo.py")
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The copy, not the editable install, must be what doit imports: otherwise profile edits here go unseen.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import controller.profile as p, controller.compiler as c; print(p.BUILTIN_PROFILES_DIR); print(c.__file__)",
        ],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        check=True,
    )
    profiles_dir, compiler_init = probe.stdout.splitlines()
    assert Path(profiles_dir) == root / "profiles"
    assert Path(compiler_init).is_relative_to(root)
    return root


def test_list_has_a_compile_task_per_creatable_profile(tree: Path) -> None:
    result = doit(tree, "list", "--all", "--quiet")
    assert result.returncode == 0, result.stderr
    names = set(result.stdout.split())
    creatable = {entry.name for entry in builtin_profiles(tree / "profiles") if not entry.abstract}
    assert {name for name in names if name.startswith("compile")} == {"compile"} | {f"compile:{name}" for name in creatable}
    for family in ("create", "destroy"):
        assert {name for name in names if name.startswith(family)} == {family} | {f"{family}:{name}" for name in creatable}
    assert EXTENDS_LOCKED | DOES_NOT_EXTEND_LOCKED <= creatable
    assert not [name for name in names if name.startswith("compile:base")]


def test_compile_goose_writes_the_plan_then_is_up_to_date(tree: Path) -> None:
    first = doit(tree, "compile:goose")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran(first) == {"compile:goose"}
    out_dir = tree / "build" / "goose"
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(PLAN_FILES)
    expected = compile_profile(load_profile("goose")[0]).files()
    assert {name: (out_dir / name).read_text(encoding="utf-8") for name in PLAN_FILES} == expected
    assert (tree / ".doit.json").is_file()
    before = mtimes(out_dir)

    second = doit(tree, "compile:goose")
    assert second.returncode == 0, second.stdout + second.stderr
    assert (ran(second), up_to_date(second)) == (set(), {"compile:goose"})
    assert mtimes(out_dir) == before


def test_changing_a_fragment_recompiles_exactly_the_profiles_extending_it(tree: Path) -> None:
    resolver = ProfileResolver(builtin_dir=tree / "profiles", extra_dirs=[])
    locked = tree / "profiles" / "base" / "network" / "locked.yaml"
    extending = {name for name in EXTENDS_LOCKED | DOES_NOT_EXTEND_LOCKED if locked in resolver.load(name).files}
    assert extending == EXTENDS_LOCKED

    every = [f"compile:{name}" for name in sorted(EXTENDS_LOCKED | DOES_NOT_EXTEND_LOCKED)]
    first = doit(tree, *every)
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran(first) == set(every)
    before = {name: mtimes(tree / "build" / name) for name in EXTENDS_LOCKED | DOES_NOT_EXTEND_LOCKED}

    change_content(locked)
    second = doit(tree, *every)
    assert second.returncode == 0, second.stdout + second.stderr
    assert ran(second) == {f"compile:{name}" for name in EXTENDS_LOCKED}
    assert up_to_date(second) == {f"compile:{name}" for name in DOES_NOT_EXTEND_LOCKED}
    # A comment changes no plan, so even the tasks that ran leave their files alone.
    assert {name: mtimes(tree / "build" / name) for name in before} == before

    third = doit(tree, *every)
    assert (ran(third), up_to_date(third)) == (set(), set(every))


def test_open_dev_recompiles_when_locked_changes_and_goose_does_not(tree: Path) -> None:
    assert doit(tree, "compile:open-dev", "compile:goose").returncode == 0
    locked = tree / "profiles" / "base" / "network" / "locked.yaml"
    text = locked.read_text(encoding="utf-8")
    assert "        - .github.com\n" in text
    locked.write_text(
        text.replace("        - .github.com\n", "        - .github.com\n        - .example.org\n"), encoding="utf-8"
    )
    result = doit(tree, "compile:open-dev", "compile:goose")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran(result) == {"compile:open-dev"}
    assert up_to_date(result) == {"compile:goose"}
    host_agent = (tree / "build" / "open-dev" / "host-agent.json").read_text(encoding="utf-8")
    assert '"example.org"' in host_agent
    assert '"example.org"' not in (tree / "build" / "goose" / "host-agent.json").read_text(encoding="utf-8")


def test_changing_the_profile_itself_recompiles_it(tree: Path) -> None:
    assert doit(tree, "compile:goose").returncode == 0
    goose = tree / "profiles" / "goose.yaml"
    goose.write_text(goose.read_text(encoding="utf-8").replace('ttl: "4h"', 'ttl: "7d"'), encoding="utf-8")
    result = doit(tree, "compile:goose")
    assert ran(result) == {"compile:goose"}
    assert '"ttl_seconds": 604800' in (tree / "build" / "goose" / "host-agent.json").read_text(encoding="utf-8")


def test_changing_a_compiler_source_recompiles(tree: Path) -> None:
    assert doit(tree, "compile:goose", "compile:sealed").returncode == 0
    change_content(tree / "controller" / "compiler" / "iam.py")
    result = doit(tree, "compile:goose", "compile:sealed")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran(result) == {"compile:goose", "compile:sealed"}


def test_a_deleted_target_is_rebuilt(tree: Path) -> None:
    assert doit(tree, "compile:goose").returncode == 0
    (tree / "build" / "goose" / "userdata.sh").unlink()
    result = doit(tree, "compile:goose")
    assert ran(result) == {"compile:goose"}
    assert (tree / "build" / "goose" / "userdata.sh").is_file()


def test_an_invalid_profile_fails_its_task_with_the_finding(tree: Path) -> None:
    goose = tree / "profiles" / "goose.yaml"
    goose.write_text(goose.read_text(encoding="utf-8").replace('ttl: "4h"', 'ttl: "4 hours"'), encoding="utf-8")
    result = doit(tree, "compile:goose")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "spec.lifecycle.ttl" in output
    assert re.search(r"goose\.yaml:8\b", output), output
    assert not (tree / "build" / "goose").exists()


def test_a_missing_parent_still_lists_the_task_and_fails_it(tree: Path) -> None:
    open_dev = tree / "profiles" / "open-dev.yaml"
    open_dev.write_text(
        open_dev.read_text(encoding="utf-8").replace("base/network/locked", "base/network/missing"), encoding="utf-8"
    )
    listing = doit(tree, "list", "--all", "--quiet")
    assert listing.returncode == 0, listing.stderr
    assert "compile:open-dev" in listing.stdout.split()
    result = doit(tree, "compile:open-dev")
    assert result.returncode != 0
    assert "base/network/missing" in result.stdout + result.stderr


def test_a_new_top_level_profile_gets_a_task(tree: Path) -> None:
    text = (tree / "profiles" / "goose.yaml").read_text(encoding="utf-8")
    (tree / "profiles" / "mine.yaml").write_text(text.replace("name: goose", "name: mine"), encoding="utf-8")
    assert "compile:mine" in doit(tree, "list", "--all", "--quiet").stdout.split()
    first = doit(tree, "compile:mine")
    assert ran(first) == {"compile:mine"}
    assert sorted(path.name for path in (tree / "build" / "mine").iterdir()) == sorted(PLAN_FILES)
    assert up_to_date(doit(tree, "compile:mine")) == {"compile:mine"}


def test_a_profile_in_a_subdirectory_becomes_up_to_date(tree: Path) -> None:
    text = (tree / "profiles" / "goose.yaml").read_text(encoding="utf-8")
    (tree / "profiles" / "team").mkdir()
    (tree / "profiles" / "team" / "dev.yaml").write_text(text.replace("name: goose", "name: dev"), encoding="utf-8")
    first = doit(tree, "compile:team/dev")
    assert first.returncode == 0, first.stdout + first.stderr
    second = doit(tree, "compile:team/dev")
    assert up_to_date(second) == {"compile:team/dev"}
