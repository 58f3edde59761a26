"""Where the local state database lives, by the same rules for `km` and `doit`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

STATE_FILE_NAME = "state.db"
SYSTEM_STATE_DIR = Path("/var/lib/km")


def default_state_path(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """`$KM_STATE_DIR/state.db`; else `/var/lib/km/state.db` for root; else the XDG state directory.

    `env` and `euid` default to this process's; tests pass their own.
    """
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if env.get("KM_STATE_DIR"):
        state_dir = Path(env["KM_STATE_DIR"])
        # A quoted `~` reaches us unexpanded; expand it against the same HOME as the rest of the rules.
        if state_dir.parts[0] == "~":
            state_dir = home.joinpath(*state_dir.parts[1:])
        return state_dir / STATE_FILE_NAME
    if euid == 0:
        return SYSTEM_STATE_DIR / STATE_FILE_NAME
    # The XDG spec says a relative $XDG_STATE_HOME is invalid and must be ignored.
    xdg_state_home = env.get("XDG_STATE_HOME", "")
    if xdg_state_home and Path(xdg_state_home).is_absolute():
        return Path(xdg_state_home) / "km" / STATE_FILE_NAME
    return home / ".local" / "state" / "km" / STATE_FILE_NAME
