"""Turns watchdog events on the runs tree into "this run file changed" notes for the queue.

The run wrapper writes each file as `.<name>.tmp` and renames it, so a finished file shows up as a move;
appended files (a streamed output) show up as modifications. A run directory that appears already full
(created elsewhere and moved in) is listed at once, since its files produce no events of their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from host_agent.outbox.runfiles import RunFile, files_in_run, is_final_name, run_file_at

log = logging.getLogger("km-host-agent.outbox")

# Deletions, opens and reads change nothing that needs uploading.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


class RunsTreeHandler(FileSystemEventHandler):
    def __init__(self, runs_root: Path, changed: Callable[[RunFile], None]) -> None:
        self.runs_root = runs_root
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = Path(os.fsdecode(event.dest_path or event.src_path))
        try:
            if not event.is_directory:
                run_file = run_file_at(self.runs_root, path)
                if run_file is not None:
                    self._changed(run_file)
            elif path.parent == self.runs_root and is_final_name(path.name):
                for run_file in files_in_run(self.runs_root, path.name):
                    self._changed(run_file)
        except Exception as error:  # An exception would end watchdog's thread and every later upload with it.
            log.exception("cannot queue a run file change", extra={"fields": {"path": str(path), "error": str(error)}})
