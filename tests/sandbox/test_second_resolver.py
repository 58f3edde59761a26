"""No second resolver: in an image that runs systemd-resolved and nscd the way Amazon Linux 2023 and
Ubuntu AMIs do (amis/debian-12-resolved.yaml), the host agent's resolver is the only way to resolve a name.

Before the host agent existed, resolved and nscd answered any local user (stub, D-Bus, varlink, nss) from
outside the agent's units, and cached what first boot had looked up. The profile's initCommands look up a
denied name during first boot, when nothing is gated yet, so a cache that survived first boot would hand
it to the agent afterwards. Every test reaches only the world's namespace, which the test created.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.images.bake import bake
from controller.images.store import Image
from tests.sandbox.test_egress_gate import create_in_world, probe
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, DNS, World

pytestmark = pytest.mark.root
ALIAS = "oneresolver"
IMAGE = "debian-12-resolved"
# Looked up by first boot's initCommands (exempt, before the gate): the world answers it, and nothing
# may remember the answer for the agent.
PRIMED = "evilallowed.test"
PROFILE = textwrap.dedent(f"""\
    apiVersion: klankermaker.ai/v1alpha1
    kind: SandboxProfile
    metadata: {{name: oneresolver, prefix: or}}
    spec:
      lifecycle: {{ttl: "2h", idleTimeout: "30m", teardownPolicy: destroy}}
      runtime: {{substrate: local, instanceType: t3.small, region: us-east-1, ami: {IMAGE}}}
      execution:
        shell: /bin/bash
        workingDir: /workspace
        initCommands:
          - "getent hosts {PRIMED} > /var/lib/km/primed"
      network:
        enforcement: ebpf
        egress:
          allowedDNSSuffixes: [.allowed.test]
    """)
RESOLVE_HOSTNAME = ["busctl", "call", "org.freedesktop.resolve1", "/org/freedesktop/resolve1",
                    "org.freedesktop.resolve1.Manager", "ResolveHostname", "isit", "0", "evil.test", "0", "0"]  # fmt: skip
# A varlink call straight to resolved's socket, as nss-resolve makes it: the answer, or why there was none.
VARLINK_RESOLVE = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "try:\n"
    "    s.connect('/run/systemd/resolve/io.systemd.Resolve')\n"
    "    s.sendall(json.dumps({'method': 'io.systemd.Resolve.ResolveHostname', 'parameters': {'name': sys.argv[1]}}).encode() + b'\\0')\n"
    "    print('answer', s.recv(65536).decode(errors='replace'))\n"
    "except OSError as error:\n"
    "    print('refused', type(error).__name__)\n"
)
GETADDRINFO = "import socket\ntry:\n    print(socket.getaddrinfo('evil.test', 80))\nexcept socket.gaierror as error:\n    print('gaierror', error.errno)\n"


@pytest.fixture(scope="module")
def resolved_image(local_env: Path) -> Image:
    return bake(IMAGE)[0]


@pytest.fixture(scope="module")
def sandbox(world: World, resolved_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("oneresolver") / "oneresolver.yaml"
    profile.write_text(PROFILE)
    sandbox_id = create_in_world(profile, ALIAS)
    try:
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def run(*argv: str, root: bool = False) -> tuple[int, str]:
    """An argv in the sandbox, as the sandbox user in the agent slice (or as the operator's root); a
    lookup that hangs (nscd waiting on a resolver that is not answering) counts as no answer."""
    result = km("shell", ALIAS, *(["--root"] if root else []), "--", "timeout", "30", *argv, check=False)
    return result.returncode, result.stdout + result.stderr


def test_the_image_runs_resolved_and_nscd_as_the_amis_do(resolved_image: Image) -> None:
    """Without this the rest would prove nothing: the image must start with a second resolver."""
    etc = resolved_image.rootfs / "etc"
    assert (etc / "resolv.conf").readlink() == Path("../run/systemd/resolve/stub-resolv.conf")
    hosts = next(line for line in (etc / "nsswitch.conf").read_text().splitlines() if line.startswith("hosts:"))
    assert re.search(r"\bresolve \[!UNAVAIL=return\]", hosts)
    assert (etc / "systemd/system/sysinit.target.wants/systemd-resolved.service").is_symlink()
    assert (etc / "systemd/system/dbus-org.freedesktop.resolve1.service").is_symlink()
    assert (etc / "systemd/system/multi-user.target.wants/nscd.service").is_symlink()


def test_first_boot_resolved_the_primed_name_itself(sandbox: str, world: World) -> None:
    """The priming really happened (exempt, straight to the world), so the refusals below mean something."""
    assert world.queries().get(f"{PRIMED}.", 0) >= 1
    code, output = run("cat", "/var/lib/km/primed", root=True)
    assert code == 0 and ADDRESSES["evil"] in output


def test_a_denied_name_resolves_through_no_path_at_all(sandbox: str, world: World) -> None:
    code, output = run("getent", "hosts", "evil.test")
    assert code != 0 and ADDRESSES["evil"] not in output
    code, output = run("resolvectl", "query", "evil.test")
    assert code != 0 and ADDRESSES["evil"] not in output
    code, output = run(*RESOLVE_HOSTNAME)
    assert code != 0 and ADDRESSES["evil"] not in output
    assert run("python3", "-c", GETADDRINFO)[1].startswith("gaierror")
    assert run("python3", "-c", VARLINK_RESOLVE, "evil.test")[1].startswith("refused")
    assert "evil.test." not in world.queries()


def test_what_first_boot_looked_up_is_not_remembered_for_the_agent(sandbox: str) -> None:
    code, output = run("getent", "hosts", PRIMED)
    assert code != 0 and ADDRESSES["evil"] not in output
    assert probe("resolve", PRIMED, alias=ALIAS).startswith("gaierror")
    assert run("python3", "-c", VARLINK_RESOLVE, PRIMED)[1].startswith("refused")
    code, output = run("resolvectl", "query", PRIMED, root=True)  # resolved's cache, had it survived
    assert code != 0 and ADDRESSES["evil"] not in output


def test_resolved_and_nscd_are_gone_for_root_too(sandbox: str) -> None:
    """As the operator's root (the real system bus, no gate): resolved cannot be reached or activated."""
    code, output = run(*RESOLVE_HOSTNAME, root=True)
    assert code != 0 and ADDRESSES["evil"] not in output
    code, output = run("resolvectl", "query", "evil.test", root=True)
    assert code != 0 and ADDRESSES["evil"] not in output
    assert run("python3", "-c", VARLINK_RESOLVE, "evil.test", root=True)[1].startswith("refused")
    for unit in ("systemd-resolved.service", "nscd.service"):
        assert run("systemctl", "is-enabled", unit, root=True)[1].strip() == "masked"
        assert run("systemctl", "is-active", unit, root=True)[1].strip() == "inactive"
    code, output = run("ss", "-lnu", root=True)
    assert code == 0 and "127.0.0.53:53" not in output


def test_nsswitch_and_resolv_conf_name_only_the_real_upstream(sandbox: str) -> None:
    code, hosts = run("grep", "^hosts:", "/etc/nsswitch.conf", root=True)
    assert code == 0 and hosts.split() == ["hosts:", "files", "dns"]
    code, kind = run("stat", "-c", "%F", "/etc/resolv.conf", root=True)
    assert kind.strip() == "regular file"
    code, resolv_conf = run("cat", "/etc/resolv.conf", root=True)
    assert [line.split() for line in resolv_conf.splitlines() if line.startswith("nameserver")] == [["nameserver", DNS]]


def test_allowed_names_still_resolve_and_connect(sandbox: str) -> None:
    code, output = run("getent", "hosts", "allowed.test")
    assert code == 0 and output.split()[0] == ADDRESSES["allowed"]
    assert probe("http", "allowed.test", alias=ALIAS) == f"hello from {ADDRESSES['allowed']}"


def test_running_the_section_again_changes_nothing(sandbox: str) -> None:
    """A resumed or re-run first boot: the section finds resolved masked and resolv.conf plain, and keeps both."""
    userdata = run("cat", "/etc/km/userdata.sh", root=True)[1]
    helpers = re.search(r"^km_log\(\) .*?$\n", userdata, re.M)
    write_file = re.search(r"^km_write_file\(\) \{.*?^\}$", userdata, re.M | re.S)
    section = re.search(r"^km_log 'dns: one resolver'$.*?^km_one_resolver$", userdata, re.M | re.S)
    assert helpers and write_file and section
    before = run("cat", "/etc/resolv.conf", "/etc/nsswitch.conf", root=True)[1]
    script = "set -Eeuo pipefail\n" + helpers.group(0) + write_file.group(0) + "\n" + section.group(0) + "\n"
    code, output = run("bash", "-c", script, root=True)
    assert code == 0, output
    assert "masking" not in output and "/etc/resolv.conf names" not in output
    assert run("cat", "/etc/resolv.conf", "/etc/nsswitch.conf", root=True)[1] == before
    assert probe("resolve", "allowed.test", alias=ALIAS) == ADDRESSES["allowed"]


@pytest.fixture(scope="module")
def plain_sandbox(world: World, debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sandbox of the default image, which has neither resolved nor nscd."""
    profile = tmp_path_factory.mktemp("plainresolver") / "plainresolver.yaml"
    plain = PROFILE.replace("oneresolver", "plainresolver").replace(f"ami: {IMAGE}", "ami: debian-12")
    # No initCommands: there first boot resolves through nspawn's copy of the host's resolv.conf, not the world.
    plain = re.sub(r"\n *initCommands:\n *- [^\n]*", "", plain)
    assert "initCommands" not in plain
    profile.write_text(plain)
    sandbox_id = create_in_world(profile, "plainresolver")
    try:
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def test_on_an_image_without_them_the_section_finds_nothing_to_do(plain_sandbox: str) -> None:
    result = km("shell", "plainresolver", "--root", "--", "cat", "/var/log/km-userdata.log", "/etc/resolv.conf")
    assert "km-userdata: dns: one resolver" in result.stdout
    assert "dns: masking" not in result.stdout and "dns: nsswitch" not in result.stdout
    assert "# km: the upstream resolver" not in result.stdout  # resolv.conf is still nspawn's copy of the host's
    assert probe("resolve", "allowed.test", alias="plainresolver") == ADDRESSES["allowed"]
