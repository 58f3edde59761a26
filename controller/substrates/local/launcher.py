"""Who supervises a sandbox's nspawn process: the host's systemd when it is PID 1, km itself otherwise.

Both launchers boot the same `systemd-nspawn -b` command line and give the substrate the same
answers (nspawn pid, leader pid, running, frozen, the machine's cgroup2 directory), so the
substrate, the reaper and `km doctor` never ask which one is in use — they ask `host_launcher()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from controller.substrates.local import machine
from controller.substrates.local.machine import MachineSpec, Progress
from controller.substrates.local.systemd_launch import SYSTEMD_RUN_DIR, SystemdLauncher, systemd_booted


class Launcher(Protocol):
    name: str

    def boot(self, spec: MachineSpec, timeout: float, progress: Progress = ...) -> tuple[int, int]: ...
    def is_running(self, nspawn_pid: int | None, sandbox_id: str) -> bool: ...
    def stop(self, nspawn_pid: int | None, leader_pid: int | None, sandbox_id: str, timeout: float = ...) -> None: ...
    def freeze(self, sandbox_id: str) -> None: ...
    def thaw(self, sandbox_id: str) -> None: ...
    def is_frozen(self, sandbox_id: str) -> bool: ...
    def cgroup(self, sandbox_id: str) -> Path: ...


class SelfSupervised:
    """km starts nspawn itself, in cgroups of its own (machine.py): for hosts without systemd as PID 1."""

    name = "km"

    def boot(self, spec: MachineSpec, timeout: float, progress: Progress = lambda _: None) -> tuple[int, int]:
        return machine.boot(spec, timeout, progress)

    def is_running(self, nspawn_pid: int | None, sandbox_id: str) -> bool:
        return machine.is_running(nspawn_pid, sandbox_id)

    def stop(self, nspawn_pid: int | None, leader_pid: int | None, sandbox_id: str, timeout: float = 30) -> None:
        machine.stop(nspawn_pid, leader_pid, sandbox_id, timeout)

    def freeze(self, sandbox_id: str) -> None:
        machine.freeze(sandbox_id)

    def thaw(self, sandbox_id: str) -> None:
        machine.thaw(sandbox_id)

    def is_frozen(self, sandbox_id: str) -> bool:
        return machine.is_frozen(sandbox_id)

    def cgroup(self, sandbox_id: str) -> Path:
        return machine.unified_cgroup(sandbox_id)


def host_launcher(systemd_run_dir: Path = SYSTEMD_RUN_DIR) -> Launcher:
    """The launcher for this host: systemd's when systemd is PID 1 (sd_booted), km's own otherwise."""
    return SystemdLauncher() if systemd_booted(systemd_run_dir) else SelfSupervised()
