"""Machines on a host whose PID 1 is systemd: each sandbox is a transient service of the host's systemd.

Where systemd runs the host, km hands nspawn to it instead of supervising the process itself: the
unit `km-sandbox-<id>.service` in `machine.slice` is built like systemd's own systemd-nspawn@.service
(Type=notify, Delegate=yes, KillMode=mixed, closed device policy), so systemd owns the machine's
cgroup, waits for its READY=1, stops it with SIGTERM to nspawn and, after TimeoutStopSec, SIGKILL to
the whole unit — the machine's systemd is never orphaned, whatever happens to km.

nspawn registers the machine with systemd-machined (`--register=yes --keep-unit`): on a systemd host
operators look for containers with `machinectl list`, and a km sandbox should be there, under its
own unit, with machined tracking its leader. machined ships with nspawn (systemd-container) and is
bus-activated, so this adds no dependency; without systemd (the other launcher) there is no machined.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from controller.substrates.local import machine
from controller.substrates.local.machine import MachineError, MachineSpec, Progress

SYSTEMD_RUN_DIR = Path("/run/systemd/system")
MACHINE_SLICE = "machine.slice"
UNIT_PREFIX = "km-sandbox-"
STOP_TIMEOUT_SECONDS = 30
# nspawn exits 133 when the machine asks for a reboot; km treats that as a clean stop, not a failure.
REBOOT_EXIT_STATUS = 133


def systemd_booted(run_dir: Path = SYSTEMD_RUN_DIR) -> bool:
    """sd_booted(): systemd as PID 1 creates this directory at boot, and nothing else does."""
    return run_dir.is_dir()


def unit_name(sandbox_id: str) -> str:
    return f"{UNIT_PREFIX}{sandbox_id}.service"


def systemd_run_command(spec: MachineSpec, timeout: float) -> list[str]:
    """The `systemd-run` argv that starts the machine and returns once its systemd reported READY=1."""
    return [
        "systemd-run",
        f"--unit={unit_name(spec.sandbox_id)}",
        f"--description=km sandbox {spec.sandbox_id} ({spec.hostname})",
        f"--slice={MACHINE_SLICE}",
        "--service-type=notify",  # the start job completes on nspawn's READY=1 (--notify-ready=yes)
        "--collect",  # a stopped or failed machine leaves no unit behind
        "--no-ask-password",
        "--quiet",
        "--property=Delegate=yes",  # nspawn manages the machine's cgroup subtree itself
        "--property=KillMode=mixed",  # SIGTERM to nspawn only (a clean halt); SIGKILL to all on timeout
        f"--property=SuccessExitStatus={REBOOT_EXIT_STATUS}",
        "--property=TasksMax=16384",
        f"--property=TimeoutStartSec={int(timeout)}s",
        f"--property=TimeoutStopSec={STOP_TIMEOUT_SECONDS}s",
        "--property=DevicePolicy=closed",
        "--property=DeviceAllow=/dev/net/tun rwm",
        "--property=DeviceAllow=char-pts rw",
        f"--property=StandardOutput=append:{spec.console_log}",
        "--property=StandardError=inherit",
        "--",
        *machine.nspawn_command(spec, register=True),
    ]


def unit_cgroup(sandbox_id: str) -> Path:
    """The unit's cgroup2 directory (in the unified hierarchy, wherever this host mounts it)."""
    unified = machine.CGROUP_HYBRID_UNIFIED if machine.CGROUP_HYBRID_UNIFIED.is_dir() else machine.CGROUP_ROOT
    return unified / MACHINE_SLICE / unit_name(sandbox_id)


class SystemdLauncher:
    """Machines as transient units of the host's systemd (see the module docstring)."""

    name = "systemd"

    def boot(self, spec: MachineSpec, timeout: float, progress: Progress = lambda _: None) -> tuple[int, int]:
        """Start the unit and wait (through systemd-run) for READY=1; returns (nspawn pid, leader pid)."""
        unit = unit_name(spec.sandbox_id)
        self._forget(unit)  # a failed unit from an interrupted create would refuse the name
        spec.console_log.touch()
        seen = spec.console_log.stat().st_size  # report only this boot's lines
        argv = systemd_run_command(spec, timeout)
        starter = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout + STOP_TIMEOUT_SECONDS  # systemd itself gives up after `timeout`
        while starter.poll() is None and time.monotonic() < deadline:
            seen = machine.report_console(spec.console_log, seen, progress)
            time.sleep(0.1)
        machine.report_console(spec.console_log, seen, progress)
        try:
            if starter.poll() is None:
                starter.kill()
                tail = machine.console_tail(spec.console_log)
                raise MachineError(f"{unit} did not finish starting within {timeout:.0f}s:\n{tail}")
            _, errors = starter.communicate()
            if starter.returncode != 0:
                raise MachineError(
                    f"systemd could not start {unit} ({errors.strip()}); `journalctl -u {unit}` has systemd's side, "
                    f"the console said:\n{machine.console_tail(spec.console_log)}"
                )
            return self._main_pid(unit), self._leader_pid(spec.sandbox_id)
        except BaseException:
            self.stop(None, None, spec.sandbox_id, timeout=10)
            raise

    def is_running(self, nspawn_pid: int | None, sandbox_id: str) -> bool:
        return _systemctl("is-active", unit_name(sandbox_id)).stdout.strip() in ("active", "reloading")

    def stop(self, nspawn_pid: int | None, leader_pid: int | None, sandbox_id: str, timeout: float = 30) -> None:
        """Stop the unit: systemd halts the machine and escalates to SIGKILL of the whole unit on timeout."""
        unit = unit_name(sandbox_id)
        self.thaw(sandbox_id)  # a frozen machine cannot act on SIGTERM
        _systemctl("stop", unit)  # waits; the unit's own TimeoutStopSec bounds it (`timeout` is km's side only)
        self._forget(unit)

    def freeze(self, sandbox_id: str) -> None:
        """`systemctl freeze` where systemd supports it (pure cgroup v2), the unit's cgroup.freeze otherwise."""
        if _systemctl("freeze", unit_name(sandbox_id)).returncode != 0:
            (unit_cgroup(sandbox_id) / "cgroup.freeze").write_text("1")

    def thaw(self, sandbox_id: str) -> None:
        _systemctl("thaw", unit_name(sandbox_id))  # refuses on hosts that cannot freeze units; then:
        freeze_file = unit_cgroup(sandbox_id) / "cgroup.freeze"
        if freeze_file.exists() and freeze_file.read_text().strip() == "1":
            freeze_file.write_text("0")

    def is_frozen(self, sandbox_id: str) -> bool:
        events = unit_cgroup(sandbox_id) / "cgroup.events"
        return events.exists() and "frozen 1" in events.read_text()

    def cgroup(self, sandbox_id: str) -> Path:
        return unit_cgroup(sandbox_id)

    def _main_pid(self, unit: str) -> int:
        pid = _systemctl("show", "--property=MainPID", "--value", unit).stdout.strip()
        if not pid.isdigit() or pid == "0":
            raise MachineError(f"{unit} started but has no main process (MainPID={pid!r})")
        return int(pid)

    def _leader_pid(self, sandbox_id: str) -> int:
        result = subprocess.run(
            ["machinectl", "show", "--property=Leader", "--value", sandbox_id], capture_output=True, text=True, check=False
        )
        leader = result.stdout.strip()
        if result.returncode != 0 or not leader.isdigit():
            raise MachineError(f"systemd-machined does not know machine {sandbox_id}: {result.stderr.strip() or leader!r}")
        return int(leader)

    def _forget(self, unit: str) -> None:
        _systemctl("reset-failed", unit)


def leftover_units() -> dict[str, str]:
    """Sandbox id → unit name of every km unit systemd has loaded (running, stopping or failed)."""
    result = _systemctl("list-units", "--all", "--plain", "--no-legend", "--full", f"{UNIT_PREFIX}*")
    units = {}
    for match in re.finditer(rf"\b{re.escape(UNIT_PREFIX)}(\S+)\.service\b", result.stdout):
        units[match.group(1)] = match.group(0)
    return units


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", "--no-ask-password", *args], capture_output=True, text=True, check=False)
