"""First boot's one-resolver section (systemd-resolved and nscd masked, nsswitch without `resolve`,
resolv.conf naming the real upstream): its shell helpers run for real in bash, taken from the rendered
script. The whole section runs in a real sandbox in tests/sandbox/test_second_resolver.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from tests.helpers import goose_variant


def userdata(tmp_path: Path) -> str:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["initCommands"] = ["getent hosts example.com"]

    return compile_profile(goose_variant(tmp_path, edit)).userdata


def function(script: str, name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{.*?^\}}$", script, re.M | re.S)
    assert match, f"the script defines {name}"
    return match.group(0)


@pytest.mark.parametrize(
    ("upstream", "nameserver"),
    [
        ("10.0.0.2", "10.0.0.2"),
        ("10.0.0.2:53", "10.0.0.2"),
        ("fd00:ec2::253", "fd00:ec2::253"),
        ("[fd00:ec2::253]:53", "fd00:ec2::253"),
        ("127.0.0.1:5353", None),  # resolv.conf cannot name another port
        ("[::1]:5353", None),
    ],
)
def test_the_substrates_upstream_becomes_a_nameserver_only_on_port_53(
    tmp_path: Path, upstream: str, nameserver: str | None
) -> None:
    script = function(userdata(tmp_path), "km_port53_nameserver") + '\nkm_port53_nameserver "$1"\n'
    result = subprocess.run(["bash", "-c", script, "bash", upstream], capture_output=True, text=True, check=False)
    if nameserver is None:
        assert result.returncode != 0 and result.stdout == ""
    else:
        assert (result.returncode, result.stdout) == (0, nameserver + "\n")


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ("hosts:          files resolve [!UNAVAIL=return] dns", "hosts:          files dns"),  # Debian, libnss-resolve
        ("hosts:      files myhostname resolve [!UNAVAIL=return] dns", "hosts:      files myhostname dns"),  # AL2023
        ("hosts: files resolve dns", "hosts: files dns"),
        ("hosts: files dns resolve", "hosts: files dns"),
        ("hosts: files mdns4_minimal [NOTFOUND=return] dns", "hosts: files mdns4_minimal [NOTFOUND=return] dns"),
        ("hosts: files dns", "hosts: files dns"),
    ],
)
def test_nsswitch_loses_resolve_and_its_action_and_nothing_else(tmp_path: Path, hosts: str, expected: str) -> None:
    nsswitch = tmp_path / "nsswitch.conf"
    others = "passwd:         files\nnetworks:       files resolve\n"
    nsswitch.write_text(f"# comment resolve\n{hosts}\n{others}")
    sed = next(line.strip() for line in userdata(tmp_path).splitlines() if "sed -E -i '/^hosts:/" in line)
    subprocess.run(["bash", "-c", sed.replace("/etc/nsswitch.conf", str(nsswitch))], check=True)
    assert nsswitch.read_text() == f"# comment resolve\n{expected}\n{others}"


def test_the_section_runs_before_init_commands_and_the_host_agent(tmp_path: Path) -> None:
    """Nothing first boot resolves may wait in resolved's or nscd's cache, and the host agent reads the
    upstream from resolv.conf when it starts."""
    script = userdata(tmp_path)
    call = script.index("\nkm_one_resolver\n")
    assert call < script.index("bash /opt/km/init.sh") < script.index("systemctl start km-host-agent.service")
