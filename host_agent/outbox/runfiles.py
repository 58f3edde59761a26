"""Which files of the runs tree the outbox uploads, and how it tells whether one changed.

The runs tree is `<runs_root>/<run_id>/<name>`. Every regular file directly inside a run directory is
uploaded (result.json, status, exit_code, started_at, ended_at, stderr.log, request.json, prompt,
output.*), except temp files: the run wrapper writes `.<name>.tmp` and renames it into place, so a name
starting with "." is never final. Subdirectories, and run directories starting with ".", are skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

STATUS = "status"


@dataclass(frozen=True, order=True)
class RunFile:
    """One uploadable file, named the way the store names it: by run and file name."""

    run_id: str
    name: str

    def path(self, runs_root: Path) -> Path:
        return runs_root / self.run_id / self.name

    def key(self, sandbox_id: str) -> str:
        """The object key below the target's own prefix."""
        return f"agent-runs/{sandbox_id}/{self.run_id}/{self.name}"


class Fingerprint(NamedTuple):
    """What a file looked like when it was uploaded; a different fingerprint means new content.

    The inode is included because the run wrapper replaces files by rename: a rewrite with the same size
    inside one coarse mtime tick still gets a new inode.
    """

    size: int
    mtime_ns: int
    inode: int


def is_final_name(name: str) -> bool:
    return bool(name) and not name.startswith(".")


def run_file_at(runs_root: Path, path: str | Path) -> RunFile | None:
    """The run file a path names, or None if it is not `<runs_root>/<run_id>/<final name>`."""
    try:
        parts = Path(path).relative_to(runs_root).parts
    except ValueError:
        return None
    if len(parts) != 2 or not all(is_final_name(part) for part in parts):
        return None
    return RunFile(run_id=parts[0], name=parts[1])


def fingerprint(path: Path) -> Fingerprint | None:
    """The file's fingerprint, or None if it is gone or not a regular file (a FIFO would block a reader)."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return Fingerprint(size=info.st_size, mtime_ns=info.st_mtime_ns, inode=info.st_ino)


def files_in_run(runs_root: Path, run_id: str) -> Iterator[RunFile]:
    """Uploadable files of one run directory, in name order; nothing if the directory is gone."""
    try:
        entries = sorted(os.scandir(runs_root / run_id), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if is_final_name(entry.name) and entry.is_file(follow_symlinks=False):
            yield RunFile(run_id=run_id, name=entry.name)


def files_in_tree(runs_root: Path) -> Iterator[RunFile]:
    """Every uploadable file under the runs root, run by run."""
    try:
        runs = sorted(entry.name for entry in os.scandir(runs_root) if entry.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return
    for run_id in runs:
        if is_final_name(run_id):
            yield from files_in_run(runs_root, run_id)
