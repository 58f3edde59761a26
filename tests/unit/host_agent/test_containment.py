"""What the agent's units are started with, and which cgroups the gate leaves alone (issue 14, part 1).

The settings themselves are proved in a real privileged sandbox (tests/sandbox/test_privileged.py);
here: the tmux unit file and `km shell` carry exactly the same ones, and the pure choices around them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from controller.substrates.local import machine
from host_agent import containment
from host_agent.gatekeeper.component import exempt_cgroups, first_boot_finished, own_cgroup


def unit_text(name: str) -> str:
    return resources.files("host_agent").joinpath(f"systemd/{name}").read_text(encoding="utf-8")


def test_the_tmux_unit_carries_exactly_the_agent_settings_and_enters_as_the_agent() -> None:
    lines = unit_text("km-agent-tmux.service").splitlines()
    for setting in containment.agent_unit_properties():
        assert setting in lines
    assert not [line for line in lines if line.startswith(("User=", "NoNewPrivileges", "SystemCallFilter", "RuntimeDirectory="))]
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.removeprefix("ExecStart=").split()[: len(containment.as_agent([]))] == containment.as_agent([])


def test_km_shell_starts_the_sandbox_user_with_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(machine.subprocess, "run", lambda command, **_: seen.append(command))
    machine.run_inside(42, ["/bin/bash", "--login"], user="sandbox")
    command = seen[0]
    properties = [argument.removeprefix("--property=") for argument in command if argument.startswith("--property=")]
    assert properties == containment.agent_unit_properties()
    assert "--uid=sandbox" not in command  # root starts the unit; setpriv makes it the sandbox user
    assert command[command.index("--") + 1 :] == containment.as_agent(["/bin/bash", "--login"])
    assert f"--slice={containment.AGENT_SLICE}" in command


def test_root_commands_go_to_the_operator_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(machine.subprocess, "run", lambda command, **_: seen.append(command))
    machine.run_inside(42, ["id"], user=None, in_agent_slice=False)
    assert f"--slice={containment.OPERATOR_SLICE}" in seen[0]
    assert not [argument for argument in seen[0] if argument.startswith("--property=")]


def test_setpriv_keeps_only_the_agent_capabilities() -> None:
    bounding = next(argument for argument in containment.as_agent([]) if argument.startswith("--bounding-set="))
    kept = {name.removeprefix("+") for name in bounding.removeprefix("--bounding-set=").split(",")[1:]}
    assert bounding.split(",")[0] == "--bounding-set=-all"
    assert kept == {name.removeprefix("CAP_").lower() for name in containment.AGENT_CAPABILITIES}
    assert not kept & {name.removeprefix("CAP_").lower() for name in containment.FORBIDDEN_CAPABILITIES}


def test_the_real_bus_is_replaced_without_a_fallback() -> None:
    binding = next(setting for setting in containment.agent_unit_properties() if setting.startswith("BindReadOnlyPaths="))
    assert binding == "BindReadOnlyPaths=/run/km-bus/system_bus_socket:/run/dbus/system_bus_socket"  # no `-`
    hidden = next(setting for setting in containment.agent_unit_properties() if setting.startswith("InaccessiblePaths="))
    hidden_paths = hidden.removeprefix("InaccessiblePaths=").split()
    assert "-/run/systemd/private" in hidden_paths and "-/run/kmgate" in hidden_paths


def test_every_drop_in_directory_of_km_units_is_made_at_start_and_read_only() -> None:
    read_only = set(containment.READ_ONLY_PATHS)
    for base in ("/etc/systemd/system", "/usr/lib/systemd/system", "/usr/local/lib/systemd/system"):
        for unit in ("km-host-agent.service", "km-firstboot.service", "run-kmgate.mount"):
            kind = unit.rsplit(".", 1)[1]
            for drop_in in (f"{unit}.d", f"{kind}.d"):
                assert f"{base}/{drop_in}" in containment.MADE_AT_START
                assert f"{base}/{drop_in}" in read_only


@pytest.mark.parametrize(
    ("substrate", "first_boot_done", "expected"),
    [
        ("local", False, {"km-firstboot.service", "cloud-final.service"}),
        ("local", True, set()),
        ("ec2", True, {"amazon-ssm-agent.service", "snap.amazon-ssm-agent.amazon-ssm-agent.service",
                       "systemd-networkd.service", "chronyd.service", "systemd-timesyncd.service"}),
    ],
)  # fmt: skip
def test_exempt_unit_names(substrate: str, first_boot_done: bool, expected: set[str]) -> None:
    assert set(containment.exempt_unit_names(substrate, first_boot_done)) == expected


def test_exempt_cgroups_are_the_daemon_the_operator_slice_and_first_boot_while_it_runs(tmp_path: Path) -> None:
    for directory in ("kmoperator.slice", "system.slice/km-host-agent.service", "system.slice/km-firstboot.service",
                      "system.slice/dbus.service", "init.scope", "kmagent.slice"):  # fmt: skip
        (tmp_path / directory).mkdir(parents=True)
    daemon = tmp_path / "system.slice/km-host-agent.service"
    during = exempt_cgroups(tmp_path, "local", first_boot_done=False, daemon_cgroup=daemon)
    after = exempt_cgroups(tmp_path, "local", first_boot_done=True, daemon_cgroup=daemon)
    assert set(during) == {tmp_path / "kmoperator.slice", daemon, tmp_path / "system.slice/km-firstboot.service"}
    assert set(after) == {tmp_path / "kmoperator.slice", daemon}
    (tmp_path / "kmoperator.slice").rmdir()
    assert exempt_cgroups(tmp_path, "local", first_boot_done=True, daemon_cgroup=None) == []


@pytest.mark.parametrize(("content", "done"), [(None, False), ("running\n", False), ("ready\n", True), ("failed line=3\n", True)])
def test_first_boot_finishes_when_userdata_writes_its_outcome(tmp_path: Path, content: str | None, done: bool) -> None:
    status = tmp_path / "boot-status"
    if content is not None:
        status.write_text(content)
    assert first_boot_finished(status) is done


@pytest.mark.parametrize(
    ("proc_cgroup", "expected"),
    [("0::/system.slice/km-host-agent.service\n", "system.slice/km-host-agent.service"), ("0::/\n", None),
     ("1:name=systemd:/system.slice/x.service\n0::/\n", None)],
)  # fmt: skip
def test_own_cgroup_is_never_the_root(tmp_path: Path, proc_cgroup: str, expected: str | None) -> None:
    file = tmp_path / "cgroup"
    file.write_text(proc_cgroup)
    found = own_cgroup(Path("/sys/fs/cgroup/unified"), file)
    assert found == (Path("/sys/fs/cgroup/unified") / expected if expected else None)


def test_prepare_makes_every_target_and_an_empty_preload_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    containment.prepare_read_only_targets(tmp_path)
    containment.prepare_read_only_targets(tmp_path)  # idempotent
    assert all((tmp_path / path.lstrip("/")).is_dir() for path in containment.MADE_AT_START)
    assert (tmp_path / "etc/ld.so.preload").read_text() == ""
