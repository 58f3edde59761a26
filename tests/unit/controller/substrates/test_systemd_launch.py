"""Which launcher a host gets, and the exact unit km asks the host's systemd to run a machine as."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.substrates.local import machine
from controller.substrates.local.launcher import SelfSupervised, host_launcher
from controller.substrates.local.machine import MachineSpec
from controller.substrates.local.network import SandboxNetwork
from controller.substrates.local.systemd_launch import SystemdLauncher, systemd_run_command, unit_cgroup, unit_name


@pytest.fixture
def spec(tmp_path: Path) -> MachineSpec:
    return MachineSpec(
        sandbox_id="sb-12345678",
        hostname="goose",
        image_rootfs=Path("/var/lib/km/images/debian-12-abc/rootfs"),
        directory=tmp_path / "sb-12345678",
        network=SandboxNetwork("sb-12345678", 3),
        binds=((Path("/srv/efs"), "/mnt/efs"),),
    )


def test_a_host_booted_by_systemd_gets_the_systemd_launcher(tmp_path: Path) -> None:
    (tmp_path / "system").mkdir()
    assert isinstance(host_launcher(tmp_path / "system"), SystemdLauncher)


def test_a_host_without_systemd_as_pid_1_supervises_nspawn_itself(tmp_path: Path) -> None:
    assert isinstance(host_launcher(tmp_path / "system"), SelfSupervised)
    (tmp_path / "file").write_text("")  # sd_booted() wants a directory, nothing else
    assert isinstance(host_launcher(tmp_path / "file"), SelfSupervised)


def test_the_machine_is_a_notify_service_in_machine_slice_that_registers_with_machined(spec: MachineSpec) -> None:
    assert systemd_run_command(spec, timeout=120) == [
        "systemd-run",
        "--unit=km-sandbox-sb-12345678.service",
        "--description=km sandbox sb-12345678 (goose)",
        "--slice=machine.slice",
        "--service-type=notify",
        "--collect",
        "--no-ask-password",
        "--quiet",
        "--property=Delegate=yes",
        "--property=KillMode=mixed",
        "--property=SuccessExitStatus=133",
        "--property=TasksMax=16384",
        "--property=TimeoutStartSec=120s",
        "--property=TimeoutStopSec=30s",
        "--property=DevicePolicy=closed",
        "--property=DeviceAllow=/dev/net/tun rwm",
        "--property=DeviceAllow=char-pts rw",
        f"--property=StandardOutput=append:{spec.directory}/console.log",
        "--property=StandardError=inherit",
        "--",
        "systemd-nspawn",
        f"--directory={spec.directory}/rootfs",
        "--boot",
        "--machine=sb-12345678",
        "--hostname=goose",
        "--register=yes",
        "--keep-unit",
        "--console=read-only",
        "--notify-ready=yes",
        "--link-journal=no",
        "--resolv-conf=copy-host",
        "--timezone=off",
        "--network-namespace-path=/run/netns/km-sb-12345678",
        "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
        "--system-call-filter=bpf perf_event_open",
        "--bind=/srv/efs:/mnt/efs",
    ]


def test_only_the_systemd_launcher_lets_nspawn_register(spec: MachineSpec) -> None:
    self_supervised = machine.nspawn_command(spec)
    assert "--register=no" in self_supervised and "--keep-unit" in self_supervised
    assert self_supervised == [arg.replace("--register=yes", "--register=no") for arg in machine.nspawn_command(spec, True)]


def test_the_units_cgroup_is_found_in_either_cgroup2_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(machine, "CGROUP_HYBRID_UNIFIED", tmp_path / "unified")
    assert unit_cgroup("sb-12345678") == tmp_path / "machine.slice/km-sandbox-sb-12345678.service"
    (tmp_path / "unified").mkdir()
    assert unit_cgroup("sb-12345678") == tmp_path / "unified/machine.slice/km-sandbox-sb-12345678.service"
    assert unit_name("sb-12345678") == "km-sandbox-sb-12345678.service"
