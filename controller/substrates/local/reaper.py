"""TTL and idle enforcement for local sandboxes: a host-side process km starts when it is needed.

On EC2 an EventBridge schedule fires the teardown; on the local substrate nothing outside km would,
so `km create` makes sure one reaper runs (a pid file under the state directory, taken with an
exclusive lock). It wakes every few seconds, applies each expired sandbox's `teardownPolicy`
(`destroy`, `stop` or `retain`; locked sandboxes are skipped), and exits when no local sandbox is left.

Activity, for the idle timeout, is any process in the sandbox's agent slice (agent runs, `km shell`):
the host sees it as a populated cgroup.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controller.state import SandboxRecord, StateStore, default_state_path
from controller.substrates.local import machine
from controller.substrates.local.launcher import host_launcher
from controller.substrates.local.substrate import LocalSubstrate
from host_agent import containment

Log = Callable[[str], None]
INTERVAL_SECONDS = 5.0
AGENT_TMUX_UNIT = "km-agent-tmux.service"


def reaper_pid_file() -> Path:
    return default_state_path().parent / "reaper.pid"


def agent_slice_busy(sandbox_id: str) -> bool:
    """Whether anything runs in the machine's agent slice (seen from the host's cgroup tree).

    The tree can lose directories while it is read (a unit ending, a machine going down): what
    vanished is simply not activity.
    """
    try:
        unified = host_launcher().cgroup(sandbox_id)
    except machine.MachineError:
        return False
    for directory, subdirectories, _files in os.walk(unified):
        if Path(directory).name != containment.AGENT_SLICE:
            continue
        subdirectories.clear()  # what is below the slice is read here, not walked
        for unit in Path(directory).iterdir() if Path(directory).is_dir() else ():
            if _unit_busy(unit):
                return True
    return False


def _unit_busy(unit: Path) -> bool:
    try:
        if not unit.is_dir() or "populated 1" not in (unit / "cgroup.events").read_text():
            return False
        if unit.name != AGENT_TMUX_UNIT:
            return True
        # km's tmux server idles there between runs, under the wrapper that entered the agent's PID
        # namespace (host_agent/containment.py): only what runs under the server is activity.
        pids = (unit / "cgroup.procs").read_text().split()
        return len([pid for pid in pids if _command_name(pid) != "unshare"]) > 1
    except OSError:
        return False


def _command_name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def reap_once(substrate: LocalSubstrate, now: datetime | None = None, log: Log = lambda _: None) -> list[str]:
    """Apply teardown to every expired local sandbox; returns what was done, one line per sandbox."""
    now = now or datetime.now(UTC)
    done = []
    for record in substrate.store.list():
        if record.substrate != "local":
            continue
        status = substrate.observe(record)
        last = record.resources.get("last_active")
        if status == "running" and agent_slice_busy(record.sandbox_id) and (not last or datetime.fromisoformat(last) < now):
            record = substrate.store.update(record.sandbox_id, resources={**record.resources, "last_active": now.isoformat()})
        reason = _expiry_reason(record, status, now)
        if reason is None or record.locked or record.teardown_policy == "retain":
            continue
        if record.teardown_policy == "destroy":
            substrate.destroy(record)
        elif status in ("running", "paused"):
            substrate.stop(record)
        else:
            continue
        line = f"{record.alias} ({record.sandbox_id}): {reason}; {record.teardown_policy} applied"
        log(line)
        done.append(line)
    return done


def _expiry_reason(record: SandboxRecord, status: str, now: datetime) -> str | None:
    if record.ttl_expiry is not None and now >= record.ttl_expiry:
        return "TTL expired"
    if status == "running" and record.idle_timeout_seconds:
        last = record.resources.get("last_active")
        since = datetime.fromisoformat(last) if last else record.updated_at
        if now - since >= timedelta(seconds=record.idle_timeout_seconds):
            return f"idle for {record.idle_timeout_seconds // 60} minutes"
    return None


def run_reaper(store: StateStore, pid_file: Path, interval: float = INTERVAL_SECONDS) -> int:
    """The reaper's loop; only one runs per state directory (the pid file is locked for its lifetime)."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with pid_file.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another reaper holds it
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        substrate = LocalSubstrate(store)
        log = _stderr_log
        while any(record.substrate == "local" for record in store.list()):
            try:
                reap_once(substrate, log=log)
            except Exception as error:  # keep enforcing the others; say what went wrong
                log(f"reaper: {type(error).__name__}: {error}")
            time.sleep(interval)
        log("reaper: no local sandboxes left; exiting")
    return 0


def reaper_running(pid_file: Path | None = None) -> bool:
    pid_file = pid_file or reaper_pid_file()
    if not pid_file.exists():
        return False
    with pid_file.open() as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def ensure_reaper() -> None:
    """Start the reaper in the background unless one already runs for this state directory."""
    if reaper_running():
        return
    log_file = reaper_pid_file().with_suffix(".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as log:
        subprocess.Popen(
            [sys.executable, "-m", "controller.substrates.local.reaper"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=os.environ.copy(),
        )


def _stderr_log(line: str) -> None:
    print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from controller.state import SQLiteStateStore

    sys.exit(run_reaper(SQLiteStateStore(default_state_path()), reaper_pid_file()))
