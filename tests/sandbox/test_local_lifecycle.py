"""A real local sandbox from a profile, through the km commands an operator uses, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from controller.images.store import Image
from tests.sandbox.conftest import leftovers

pytestmark = pytest.mark.root
KM = str(Path(sys.executable).parent / "km")

PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: lifecycle, prefix: lc}
spec:
  lifecycle: {ttl: "2h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime:
    substrate: local
    instanceType: t3.small
    region: us-east-1
    ami: debian-12
    additionalVolume: {size: 1, mountPoint: /data}
  execution:
    shell: /bin/bash
    workingDir: /workspace
    env: {GREETING: "hello 'quoted' $world"}
    configFiles:
      /home/sandbox/.config/km/settings.json: '{"a": 1}'
      /etc/lifecycle.conf: first-version
    initCommands:
      - "echo first-boot > /var/lib/km/init-ran"
  network:
    enforcement: ebpf
    egress: {allowedDNSSuffixes: [.example.com]}
"""


def km(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KM, *args], capture_output=True, text=True, input=stdin, timeout=600, env=os.environ.copy())
    if check:
        assert result.returncode == 0, f"km {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def shell(ref: str, script: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return km("shell", ref, *extra, "--", "sh", "-c", script, check=False)


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    file = tmp_path / "lifecycle.yaml"
    file.write_text(PROFILE)
    return file


def test_create_shell_update_pause_stop_resume_lock_destroy(local_env: Path, debian_image: Image, profile_file: Path) -> None:
    created = km("create", str(profile_file), "--json")
    sandbox = json.loads(created.stdout)["sandbox"]
    sandbox_id = sandbox["id"]
    assert sandbox["status"] == "running" and sandbox_id.startswith("lc-")
    try:
        status = json.loads(km("status", "lifecycle", "--json").stdout)
        assert status["host_agent"]["status"] == "active"

        # The sandbox user, in the agent slice, under the machine's seccomp filter, with the profile applied.
        inside = shell("lifecycle", 'id -un; pwd; tail -1 /proc/self/cgroup; grep Seccomp: /proc/self/status; '
                       'printf "%s\\n" "$GREETING"; cat ~/.config/km/settings.json; echo; mountpoint -q /data && echo data-mounted; '
                       'cat /var/lib/km/init-ran; sudo -n true 2>/dev/null && echo has-sudo || echo no-sudo; exit 5')  # fmt: skip
        assert inside.returncode == 5, inside.stderr
        lines = inside.stdout.splitlines()
        assert lines[0] == "sandbox" and lines[1] == "/workspace"
        assert lines[2].startswith("0::/kmagent.slice/")
        assert lines[3].split() == ["Seccomp:", "2"]
        assert lines[4] == "hello 'quoted' $world"
        assert lines[5] == '{"a": 1}'
        assert lines[6:] == ["data-mounted", "first-boot", "no-sudo"]
        assert shell("lifecycle", "tail -1 /proc/self/cgroup", "--root").stdout.strip().startswith("0::/kmoperator.slice/")
        # The additional volume has the profile's size (1 GiB), and its data survives stop and start below.
        size_mib = int(shell("lifecycle", "df --output=size -BM /data | tail -1").stdout.strip().rstrip("M"))
        assert 900 < size_mib <= 1024, size_mib
        assert shell("lifecycle", "echo on-the-volume > /data/kept.txt").returncode == 0  # a fresh volume is the sandbox user's

        # Nothing changed: up to date, no work.
        assert km("create", str(profile_file)).stdout.startswith("lifecycle: up to date")

        # A policy change is applied live: same machine, new environment and allowlist, daemon reloaded.
        profile_file.write_text(
            PROFILE.replace("hello 'quoted' $world", "changed")
            .replace("[.example.com]", "[.example.com, .example.org]")
            .replace('{"a": 1}', '{"a": 2}')
            .replace("first-version", "second-version")
            .replace('ttl: "2h"', 'ttl: "3h"')
        )
        dry = km("create", str(profile_file), "--dry-run").stdout
        assert "would lifecycle: update in place (spec.execution.configFiles./etc/lifecycle.conf, " in dry, dry
        assert "spec.execution.env.GREETING, spec.lifecycle.ttl, spec.network.egress.allowedDNSSuffixes)" in dry, dry
        km("create", str(profile_file))
        after = json.loads(km("status", "lifecycle", "--json").stdout)
        assert after["id"] == sandbox_id and after["resources"]["leader_pid"] == sandbox["resources"]["leader_pid"]
        assert shell("lifecycle", 'printf "%s" "$GREETING"').stdout == "changed"
        # Config files are rewritten with first boot's owners: the sandbox user's home is its own, /etc is root's.
        owned = "stat -c '%U %n' /home/sandbox/.config/km/settings.json /etc/lifecycle.conf; cat /etc/lifecycle.conf"
        assert shell("lifecycle", owned, "--root").stdout.split("\n")[:3] == [
            "sandbox /home/sandbox/.config/km/settings.json",
            "root /etc/lifecycle.conf",
            "second-version",
        ]
        assert shell("lifecycle", "cat ~/.config/km/settings.json").stdout == '{"a": 2}'
        moved = datetime.fromisoformat(after["ttl_expiry"]) - datetime.fromisoformat(sandbox["ttl_expiry"])
        assert moved == timedelta(hours=1)
        agent_config = shell("lifecycle", "cat /etc/km/host-agent.json", "--root").stdout
        assert json.loads(agent_config)["egress"]["allowed_dns_suffixes"] == ["example.com", "example.org"]

        # A runtime change is a replacement, said before it is done.
        profile_file.write_text(PROFILE.replace("t3.small", "t3.medium"))
        replace = km("create", str(profile_file), "--dry-run").stdout
        assert replace.startswith("would lifecycle: replace (") and "spec.runtime.instanceType" in replace

        # Pause freezes, resume thaws; stop keeps the disk, resume boots it again without re-running first boot.
        km("pause", "lifecycle")
        assert json.loads(km("status", "lifecycle", "--json").stdout)["status"] == "paused"
        km("resume", "lifecycle")
        assert shell("lifecycle", "echo alive").stdout.strip() == "alive"
        shell("lifecycle", "echo kept > /workspace/state.txt")
        km("stop", "lifecycle")
        assert json.loads(km("list", "--json").stdout)[0]["status"] == "stopped"
        km("start", "1")
        assert shell("lifecycle", "cat /workspace/state.txt; cat /var/lib/km/init-ran").stdout.split() == ["kept", "first-boot"]
        assert shell("lifecycle", "cat /data/kept.txt").stdout.strip() == "on-the-volume"

        # Locked sandboxes refuse destroy.
        km("lock", "lifecycle")
        refused = km("destroy", "lifecycle", "--yes", check=False)
        assert refused.returncode == 1 and "is locked" in refused.stderr and "Traceback" not in refused.stderr
        replacing = km("create", str(profile_file), check=False)  # the profile now asks for a replacement
        assert replacing.returncode == 1 and "must be replaced but is locked" in replacing.stderr
        km("unlock", "lifecycle")
    finally:
        km("destroy", sandbox_id, "--yes", check=False)
    assert json.loads(km("list", "--json").stdout) == []
    assert leftovers(sandbox_id) == []


def test_extend_moves_the_ttl(local_env: Path, debian_image: Image, profile_file: Path) -> None:
    sandbox = json.loads(km("create", str(profile_file), "--alias", "extend-me", "--json").stdout)["sandbox"]
    try:
        km("extend", "extend-me", "1d")
        extended = json.loads(km("status", "extend-me", "--json").stdout)
        assert extended["ttl_expiry"] > sandbox["ttl_expiry"]
        from datetime import datetime

        gained = datetime.fromisoformat(extended["ttl_expiry"]) - datetime.fromisoformat(sandbox["ttl_expiry"])
        assert 86_000 < gained.total_seconds() < 86_500
    finally:
        km("destroy", sandbox["id"], "--yes", check=False)


def test_a_failing_first_boot_names_the_command_and_leaves_nothing(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(PROFILE.replace('"echo first-boot > /var/lib/km/init-ran"', '"echo about to fail; exit 42"'))
    result = km("create", str(broken), "--alias", "broken", check=False)
    assert result.returncode == 1
    assert "first boot did not complete" in result.stderr
    assert "exit 42" in result.stderr and "km-init: 1/1" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(km("list", "--json").stdout) == []
    created_ids = [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("lc-")]
    assert created_ids and leftovers(created_ids[0]) == []


def test_creating_an_alias_twice_at_once_makes_one_sandbox(local_env: Path, debian_image: Image, profile_file: Path) -> None:
    racers = [subprocess.Popen([KM, "create", str(profile_file), "--alias", "race"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in racers]
    listed = json.loads(km("list", "--json").stdout)
    try:
        assert [s["alias"] for s in listed] == ["race"]
        assert sorted(code for code, _ in outcomes) in ([0, 0], [0, 1])
        for code, stderr in outcomes:
            if code:
                assert "race" in stderr and "Traceback" not in stderr
    finally:
        for sandbox in listed:
            km("destroy", sandbox["id"], "--yes", check=False)


def test_errors_without_a_sandbox_are_one_line(local_env: Path) -> None:
    missing = km("status", "no-such-sandbox", check=False)
    assert missing.returncode == 1 and "no-such-sandbox" in missing.stderr and "Traceback" not in missing.stderr
    # ec2 with no AWS credentials anywhere (nor instance metadata to ask): one line that says so.
    hidden = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    hidden |= {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    ec2 = subprocess.run(
        [KM, "create", "goose", "--substrate", "ec2", "--dry-run"], capture_output=True, text=True, env=hidden, timeout=120
    )
    assert ec2.returncode == 1 and "credentials" in ec2.stderr and "Traceback" not in ec2.stderr
    assert len(ec2.stderr.strip().splitlines()) == 1
    print(textwrap.shorten(ec2.stderr, 200))


def test_a_profile_without_an_image_runs_its_yum_commands(local_env: Path, tmp_path: Path) -> None:
    # No network needed: the front end skips packages an image does not need, then succeeds.
    profile = tmp_path / "al2023.yaml"
    profile.write_text(
        PROFILE.replace("    ami: debian-12\n", "").replace(
            '"echo first-boot > /var/lib/km/init-ran"', '"yum install -y amazon-ssm-agent && dnf install -y amazon-efs-utils"'
        )
    )
    sandbox = json.loads(km("create", str(profile), "--alias", "al2023", "--json").stdout)["sandbox"]
    try:
        assert sandbox["resources"]["image"].startswith("amazon-linux-2023-")
        assert shell("al2023", "command -v yum; command -v dnf").stdout.split() == ["/usr/local/bin/yum", "/usr/local/bin/dnf"]
    finally:
        km("destroy", sandbox["id"], "--yes", check=False)
