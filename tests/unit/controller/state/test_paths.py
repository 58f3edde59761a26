"""Where the state database lives: KM_STATE_DIR, then /var/lib/km for root, then the XDG state directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.state import default_state_path

USER = 1000
ROOT = 0


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"KM_STATE_DIR": "/srv/km", "HOME": "/home/op"}, USER, "/srv/km/state.db"),
        ({"KM_STATE_DIR": "/srv/km", "HOME": "/root"}, ROOT, "/srv/km/state.db"),
        ({"KM_STATE_DIR": "/srv/km", "XDG_STATE_HOME": "/xdg"}, USER, "/srv/km/state.db"),
        ({"KM_STATE_DIR": "", "HOME": "/home/op"}, USER, "/home/op/.local/state/km/state.db"),
        ({"HOME": "/root"}, ROOT, "/var/lib/km/state.db"),
        ({"HOME": "/root", "XDG_STATE_HOME": "/xdg"}, ROOT, "/var/lib/km/state.db"),
        ({"HOME": "/home/op", "XDG_STATE_HOME": "/xdg"}, USER, "/xdg/km/state.db"),
        ({"HOME": "/home/op"}, USER, "/home/op/.local/state/km/state.db"),
        ({"HOME": "/home/op", "XDG_STATE_HOME": ""}, USER, "/home/op/.local/state/km/state.db"),
        ({"HOME": "/home/op", "XDG_STATE_HOME": "relative/dir"}, USER, "/home/op/.local/state/km/state.db"),
    ],
    ids=[
        "km-state-dir",
        "km-state-dir-beats-euid-0",
        "km-state-dir-beats-xdg",
        "empty-km-state-dir-ignored",
        "euid-0",
        "euid-0-ignores-xdg",
        "xdg",
        "home-default",
        "empty-xdg-ignored",
        "relative-xdg-ignored",
    ],
)
def test_path_rules(env: dict[str, str], euid: int, expected: str) -> None:
    assert default_state_path(env, euid) == Path(expected)


def test_km_state_dir_expands_home() -> None:
    assert default_state_path({"KM_STATE_DIR": "~/km", "HOME": "/home/op"}, USER) == Path("/home/op/km/state.db")


def test_defaults_read_this_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path))
    assert default_state_path() == tmp_path / "state.db"
    monkeypatch.delenv("KM_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    expected = Path("/var/lib/km/state.db") if os.geteuid() == 0 else tmp_path / "xdg" / "km" / "state.db"
    assert default_state_path() == expected
