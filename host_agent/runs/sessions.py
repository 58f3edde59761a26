"""tmux sessions for agent runs: one session `km-agent-<runID>` per run, on km's own tmux server.

The server runs as the sandbox user in the agent slice (the `km-agent-tmux` unit), so everything a
run starts is the sandbox user's and inside the agent cgroup, and it outlives both the daemon and any
operator's connection. The daemon drives it as root through libtmux; it checks who owns the server's
socket first, because a tmux client that finds no server starts one as itself, and an agent must never
run as root by accident.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from host_agent.paths import TMUX_SOCKET
from host_agent.runs.layout import RunDir

if TYPE_CHECKING:
    import libtmux

TMUX_UNIT: Final = "km-agent-tmux.service"
SESSION_PREFIX: Final = "km-agent-"


class SessionError(Exception):
    """A run's tmux session could not be started or found; the message says what to check."""


def session_name(run_id: str) -> str:
    return f"{SESSION_PREFIX}{run_id}"


def start_tmux_unit() -> None:
    """Start (or keep) km's tmux server under the sandbox's systemd."""
    result = subprocess.run(["systemctl", "start", TMUX_UNIT], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SessionError(f"could not start {TMUX_UNIT}: {result.stderr.strip()} (see `journalctl -u {TMUX_UNIT}`)")


class RunSessions:
    def __init__(
        self,
        socket_path: Path = TMUX_SOCKET,
        *,
        ensure_server: Callable[[], None] = start_tmux_unit,
        python: str = sys.executable,
    ) -> None:
        self.socket_path = socket_path
        self.ensure_server = ensure_server
        self.python = python

    @functools.cached_property
    def server(self) -> libtmux.Server:
        """Imported on first use: libtmux costs about 70 ms of the daemon's start, before any run exists."""
        import libtmux

        return libtmux.Server(socket_path=str(self.socket_path))

    def start(self, run: RunDir, working_dir: str, owner_uid: int) -> None:
        """A detached session whose only window runs the run wrapper on this run dir, as `owner_uid`."""
        self._require_server(owner_uid)
        command = shlex.join([self.python, "-m", "host_agent.runs.runner", str(run.path)])
        from libtmux.exc import LibTmuxException

        try:
            self.server.new_session(
                session_name=session_name(run.run_id), window_command=command, start_directory=working_dir, attach=False
            )
        except LibTmuxException as error:
            raise SessionError(f"could not start the tmux session for run {run.run_id}: {error}") from error

    def alive(self) -> set[str]:
        """Run ids whose session exists; empty when the server is not running."""
        if not self.socket_path.exists():
            return set()
        names = [session.session_name or "" for session in self.server.sessions]
        return {name.removeprefix(SESSION_PREFIX) for name in names if name.startswith(SESSION_PREFIX)}

    def kill(self, run_id: str) -> bool:
        """Close the run's session (its wrapper gets SIGHUP and records the end); False if it was gone."""
        if not self.socket_path.exists():
            return False
        from libtmux.exc import LibTmuxException

        try:
            self.server.kill_session(f"={session_name(run_id)}")  # `=`: exact name, not a pattern
        except LibTmuxException:
            return False
        return True

    def _require_server(self, owner_uid: int) -> None:
        if not self.socket_path.exists():
            self.ensure_server()
            deadline = time.monotonic() + 5
            while not self.socket_path.exists():
                if time.monotonic() > deadline:
                    raise SessionError(f"km's tmux server did not create {self.socket_path} within 5 s")
                time.sleep(0.01)
        owner = os.lstat(self.socket_path).st_uid
        if owner != owner_uid:
            raise SessionError(f"{self.socket_path} is owned by uid {owner}, not the sandbox user ({owner_uid}); refusing")
