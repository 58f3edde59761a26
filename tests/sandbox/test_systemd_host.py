"""On a host run by systemd, a local sandbox is a transient unit of that systemd, from create to destroy.

Runs on this host when systemd is its PID 1, otherwise inside a nested systemd test host
(tests/sandbox/systemd_host.py), through the km commands an operator uses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.images.store import Image
from tests.sandbox.systemd_host import SystemdHost, systemd_host

pytestmark = pytest.mark.root
KM = str(Path(sys.executable).parent / "km")

PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: sdhost, prefix: sd}
spec:
  lifecycle: {ttl: "2h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
  execution: {shell: /bin/bash, workingDir: /workspace}
  network:
    enforcement: ebpf
    egress: {allowedDNSSuffixes: [.example.com]}
"""


@pytest.fixture(scope="module")
def host(local_env: Path, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    with systemd_host(debian_image.rootfs, tmp_path_factory.mktemp("systemd-host")) as found:
        yield found


@pytest.fixture
def profile_file(host: SystemdHost) -> Path:
    file = host.working_dir / "sdhost.yaml"
    file.write_text(PROFILE)
    return file


def km(host: SystemdHost, *args: str, check: bool = True) -> str:
    result = host.run([KM, *args])
    if check:
        assert result.returncode == 0, f"km {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def unit_show(host: SystemdHost, sandbox_id: str, prop: str) -> str:
    return host.run(["systemctl", "show", f"--property={prop}", "--value", f"km-sandbox-{sandbox_id}.service"]).stdout.strip()


def leftovers(host: SystemdHost, sandbox_id: str) -> list[str]:
    """Everything a sandbox on a systemd host may leave behind, as that host sees it."""
    unit = f"km-sandbox-{sandbox_id}.service"
    checks = {
        "unit": f"systemctl list-units --all --plain --no-legend {unit} | grep -q .",
        "machine": f"machinectl show {sandbox_id} >/dev/null 2>&1",
        "cgroup": f"test -e /sys/fs/cgroup/machine.slice/{unit}",
        "network namespace": f"test -e /run/netns/km-{sandbox_id}",
        "veth": f"ip -o link | grep -q kmv-{sandbox_id[-8:]}",
        "nat rule": f"nft list table ip km 2>/dev/null | grep -q km:{sandbox_id}",
        "mount": f"grep -q {sandbox_id} /proc/self/mounts",
        "nspawn process": f"pgrep -f -- '--machin[e]={sandbox_id}' >/dev/null",  # [e]: not this shell itself
        "sandbox directory": f"test -e {host.env['KM_SANDBOX_DIR']}/{sandbox_id}",
    }
    script = "".join(f"{command} && echo '{name}'\n" for name, command in checks.items()) + "true\n"
    return host.run(["sh", "-c", script]).stdout.splitlines()


def test_create_pause_stop_start_destroy_as_a_transient_unit(host: SystemdHost, profile_file: Path) -> None:
    sandbox = json.loads(km(host, "create", str(profile_file), "--json"))["sandbox"]
    sandbox_id, resources = sandbox["id"], sandbox["resources"]
    try:
        # systemd-run returned after READY=1: the unit is up, nspawn is its main process, machined has the leader.
        assert sandbox["status"] == "running"
        assert unit_show(host, sandbox_id, "ActiveState") == "active"
        assert unit_show(host, sandbox_id, "ControlGroup") == f"/machine.slice/km-sandbox-{sandbox_id}.service"
        assert unit_show(host, sandbox_id, "MainPID") == resources["nspawn_pid"]
        leader = host.run(["machinectl", "show", "--property=Leader", "--value", sandbox_id]).stdout.strip()
        assert leader == resources["leader_pid"]
        assert json.loads(km(host, "status", "sdhost", "--json"))["host_agent"]["status"] == "active"
        inside = km(host, "shell", "sdhost", "--", "sh", "-c", "id -un; tail -1 /proc/self/cgroup").splitlines()
        assert inside[0] == "sandbox" and inside[1].startswith("0::/kmagent.slice/")

        # Pause freezes the unit (systemd knows it is frozen); resume thaws it.
        km(host, "pause", "sdhost")
        assert json.loads(km(host, "status", "sdhost", "--json"))["status"] == "paused"
        assert unit_show(host, sandbox_id, "FreezerState") == "frozen"
        km(host, "resume", "sdhost")
        assert unit_show(host, sandbox_id, "FreezerState") == "running"
        assert km(host, "shell", "sdhost", "--", "echo", "alive").strip() == "alive"

        # Stop leaves no unit, machine or process (the disk and network stay); start makes a new unit on the same disk.
        km(host, "shell", "sdhost", "--", "sh", "-c", "echo kept > /workspace/state.txt")
        km(host, "stop", "sdhost")
        assert json.loads(km(host, "list", "--json"))[0]["status"] == "stopped"
        machine_parts = {"unit", "machine", "cgroup", "nspawn process"}
        assert [item for item in leftovers(host, sandbox_id) if item in machine_parts] == []
        km(host, "start", "sdhost")
        started = json.loads(km(host, "status", "sdhost", "--json"))
        assert started["status"] == "running" and started["resources"]["nspawn_pid"] == unit_show(host, sandbox_id, "MainPID")
        assert km(host, "shell", "sdhost", "--", "cat", "/workspace/state.txt").strip() == "kept"
    finally:
        km(host, "destroy", "sdhost", "--yes", check=False)
    assert leftovers(host, sandbox_id) == []
    assert km(host, "doctor", "--local").strip() == "0 leftover(s) found"


def test_doctor_finds_and_stops_the_unit_of_a_sandbox_whose_record_was_lost(host: SystemdHost, profile_file: Path) -> None:
    sandbox_id = json.loads(km(host, "create", str(profile_file), "--alias", "lost", "--json"))["sandbox"]["id"]
    forget = f"from controller.sandboxes import state_store; state_store().delete({sandbox_id!r})"
    assert host.run([sys.executable, "-c", forget]).returncode == 0

    report = host.run([KM, "doctor", "--local", "--json"])
    assert report.returncode == 1
    found = {item["kind"]: item["detail"] for item in json.loads(report.stdout)["found"]}
    assert found["unit"] == f"km-sandbox-{sandbox_id}.service"
    assert set(found) == {"unit", "mount", "nft-rule", "veth", "netns", "directory"}  # the unit owns the process

    fixed = host.run([KM, "doctor", "--local", "--fix", "--json"])
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["remaining"] == [], fixed.stdout + fixed.stderr
    assert leftovers(host, sandbox_id) == []
