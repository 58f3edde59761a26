"""One agent run on disk: `<workingDir>/.km-agent/runs/<runID>/`, the single source of truth for a run.

The run wrapper (as the sandbox user) writes it; the daemon and the control commands (as root) read it.
Every file is replaced atomically, so a reader never sees half a status or half a result, and `status`
is always written last, so whoever sees a terminal status finds the result already there.

Root reads files the agent could have replaced, so reads refuse symlinks and cap their size: a run dir
must never become a way to make root upload or print `/etc/shadow`.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

RUNS_SUBDIR: Final = ".km-agent/runs"
STATUSES: Final = ("queued", "running", "complete", "failed", "cancelled")
TERMINAL: Final = frozenset({"complete", "failed", "cancelled"})
MAX_READ_BYTES: Final = 64 * 1024 * 1024

PROMPT: Final = "prompt"
REQUEST: Final = "request.json"
RESULT: Final = "result.json"
STATUS: Final = "status"
EXIT_CODE: Final = "exit_code"
STARTED_AT: Final = "started_at"
ENDED_AT: Final = "ended_at"
STDERR: Final = "stderr.log"
CANCEL_REQUESTED: Final = "cancel_requested"
FAILURE_REASON: Final = "failure_reason"
RUNNER_PID: Final = "runner.pid"


def new_run_id(now: datetime | None = None) -> str:
    """`YYYYMMDDTHHMMSSZ-mmmrrr`: milliseconds then 3 random hex digits, so ids sort by start time even
    within one second, and two runs started in the same millisecond still differ."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{moment.microsecond // 1000:03d}{secrets.token_hex(2)[:3]}"


def is_run_id(name: str) -> bool:
    stamp, _, suffix = name.partition("-")
    return (
        len(stamp) == 16
        and stamp[8] == "T"
        and stamp.endswith("Z")
        and (stamp[:8] + stamp[9:15]).isdigit()
        and len(suffix) == 6
        and all(c in "0123456789abcdef" for c in suffix)
    )


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a sibling dot-file, then rename it over the target (dot-files are never uploaded)."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(path)


def read_regular(path: Path, limit: int = MAX_READ_BYTES) -> bytes | None:
    """The file's bytes, or None when missing; a symlink, device or FIFO is refused (root reads these)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:  # ELOOP: a symlink where a run file should be
        raise RunFileError(f"{path}: refusing to read ({error.strerror})") from error
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise RunFileError(f"{path}: not a regular file")
        return stream.read(limit)


class RunFileError(Exception):
    """A run file that root must not trust (a symlink or special file); the message names it."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def read_text(self, name: str) -> str | None:
        data = read_regular(self.path / name)
        return None if data is None else data.decode("utf-8", errors="replace").strip()

    def write(self, name: str, content: str | bytes) -> None:
        write_atomic(self.path / name, content)

    def status(self) -> str:
        """`queued` until the wrapper starts; an unreadable status reads as `failed`, never as running."""
        try:
            value = self.read_text(STATUS)
        except RunFileError:
            return "failed"
        if value is None:
            return "queued"
        return value if value in STATUSES else "failed"

    def request(self) -> dict[str, Any]:
        data = read_regular(self.path / REQUEST)
        return {} if data is None else dict(json.loads(data))

    def result(self) -> dict[str, Any] | None:
        data = read_regular(self.path / RESULT)
        return None if data is None else dict(json.loads(data))

    def summary(self) -> dict[str, Any]:
        """What `list` and `status` print: enough to choose a run without reading its output."""
        request = self.request()
        result = self._safe_result()
        exit_code = self._safe_text(EXIT_CODE)
        return {
            "run_id": self.run_id,
            "status": self.status(),
            "agent": request.get("agent"),
            "created_at": request.get("created_at"),
            "started_at": self._safe_text(STARTED_AT),
            "ended_at": self._safe_text(ENDED_AT),
            "exit_code": int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None,
            "duration_ms": result.get("duration_ms") if result else None,
            "total_cost_usd": result.get("total_cost_usd") if result else None,
            "size_bytes": self.size_bytes(),
            "failure_reason": self._safe_text(FAILURE_REASON),
        }

    def size_bytes(self) -> int:
        total = 0
        for entry in self.path.iterdir():
            info = entry.lstat()
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
        return total

    def _safe_text(self, name: str) -> str | None:
        try:
            return self.read_text(name)
        except RunFileError:
            return None

    def _safe_result(self) -> dict[str, Any] | None:
        try:
            return self.result()
        except (RunFileError, ValueError):
            return None


def runs_root(working_dir: str | Path) -> Path:
    return Path(working_dir) / RUNS_SUBDIR


def runs_root_of(config_path: Path) -> Path:
    """The runs tree host-agent.json names, read without pydantic: read-only commands start fast."""
    with config_path.open(encoding="utf-8") as stream:
        return runs_root(json.load(stream)["execution"]["working_dir"])


def all_runs(root: Path) -> list[RunDir]:
    """Every run, oldest first (run ids sort by start time)."""
    if not root.is_dir():
        return []
    return [RunDir(entry) for entry in sorted(root.iterdir()) if is_run_id(entry.name) and entry.is_dir()]


def find_run(root: Path, run_id: str | None) -> RunDir:
    """The named run, or the latest one; a clear error when there is none."""
    runs = all_runs(root)
    if run_id is None:
        if not runs:
            raise LookupError(f"no agent runs yet in {root}")
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    matches = [run for run in runs if run.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LookupError(f"run id {run_id!r} is ambiguous: {', '.join(run.run_id for run in matches)}")
    raise LookupError(f"no run {run_id!r} in {root}")
