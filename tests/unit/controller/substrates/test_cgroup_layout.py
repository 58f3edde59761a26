"""Which cgroup directories a machine gets, on the host layouts km meets (hybrid, pure cgroup v2, none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.substrates.local import machine


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(machine, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(machine, "CGROUP_HYBRID_UNIFIED", tmp_path / "unified")
    monkeypatch.setattr(machine, "CGROUP_HYBRID_SYSTEMD", tmp_path / "systemd")
    return tmp_path


def test_hybrid_hosts_get_a_cgroup_in_name_systemd_and_in_the_unified_tree(fake_root: Path) -> None:
    (fake_root / "unified").mkdir()
    assert machine.cgroup_dirs("sb-12345678") == [
        fake_root / "systemd/km-nspawn-sb-12345678",
        fake_root / "unified/km-nspawn-sb-12345678",
    ]
    assert machine.unified_cgroup("sb-12345678") == fake_root / "unified/km-nspawn-sb-12345678"


def test_pure_cgroup2_hosts_get_one(fake_root: Path) -> None:
    (fake_root / "cgroup.controllers").write_text("cpu memory pids\n")
    assert machine.cgroup_dirs("sb-12345678") == [fake_root / "km-nspawn-sb-12345678"]


def test_without_cgroup2_the_error_says_what_is_needed(fake_root: Path) -> None:
    with pytest.raises(machine.MachineError, match="needs cgroup v2"):
        machine.require_cgroup2()
