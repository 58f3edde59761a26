"""Root creating run files in a tree the agent owns: never through a symlink the agent planted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host_agent.runs.safe_fs import make_owned_dirs, write_owned_file

UID, GID = os.getuid(), os.getgid()


def test_make_owned_dirs_creates_every_level_and_tolerates_existing_ones(tmp_path: Path) -> None:
    made = make_owned_dirs(tmp_path, Path(".km-agent/runs"), UID, GID)
    assert made == tmp_path / ".km-agent/runs" and made.is_dir()
    assert make_owned_dirs(tmp_path, Path(".km-agent/runs"), UID, GID) == made


def test_exclusive_refuses_a_last_level_that_exists(tmp_path: Path) -> None:
    make_owned_dirs(tmp_path, Path("runs/one"), UID, GID, exclusive=True)
    with pytest.raises(FileExistsError):
        make_owned_dirs(tmp_path, Path("runs/one"), UID, GID, exclusive=True)


def test_a_symlinked_level_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / ".km-agent").symlink_to(elsewhere)
    with pytest.raises(OSError):
        make_owned_dirs(work, Path(".km-agent/runs"), UID, GID)
    assert list(elsewhere.iterdir()) == []


def test_writing_over_a_planted_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    run = make_owned_dirs(tmp_path, Path("run"), UID, GID)
    (run / "status").symlink_to(precious)
    write_owned_file(run, "status", b"complete", UID, GID)
    assert precious.read_text() == "keep me"
    assert not (run / "status").is_symlink() and (run / "status").read_text() == "complete"


def test_a_symlinked_run_dir_is_refused_for_writes(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runs = make_owned_dirs(tmp_path, Path("runs"), UID, GID)
    (runs / "r1").symlink_to(elsewhere)
    with pytest.raises(OSError):
        write_owned_file(runs / "r1", "status", b"failed", UID, GID)
    assert list(elsewhere.iterdir()) == []
