"""The README's promises: its test command is what CI runs, and its profile reference matches the schema."""

from __future__ import annotations

import re

from controller.profile.reference import END_MARKER, START_MARKER, profile_reference
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)


def test_first_two_commands_set_up_run_and_test() -> None:
    main_job, tests = _commands()[:2]
    assert main_job.startswith("bash scripts/setup.sh && ")
    assert tests == "bash scripts/setup.sh && .venv/bin/pytest"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = (REPO_ROOT / ".ci/run").read_text().splitlines()
    assert _commands()[1] in ci_lines


def test_profile_reference_is_generated_from_the_schema() -> None:
    section = README[README.index(START_MARKER) + len(START_MARKER) : README.index(END_MARKER)]
    assert section.strip() == profile_reference().strip(), "run: .venv/bin/km profile reference --update README.md"


def test_every_profile_field_is_documented() -> None:
    rows = [line for line in profile_reference().splitlines() if line.startswith("| `")]
    cells = [[cell.strip() for cell in row.strip().strip("|").split(" | ")] for row in rows]
    assert all(len(row) == 4 for row in cells)
    assert [row[0] for row in cells if not row[3]] == []
