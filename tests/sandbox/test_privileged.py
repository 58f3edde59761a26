"""A privileged profile in a real local sandbox: sudo works for the agent, and root through sudo stays
inside the egress policy (issue 14, part 1).

The agent is played by `km shell` and by `km agent run --agent-cmd`, both as the sandbox user in the
agent slice; everything "as root" below goes through `sudo` from there, exactly as an agent would. The
package the agent installs comes from a small apt repository this test builds and serves in the test
world (reached as `allowed.test:8080`, through the sandbox's resolver and the gate like anything else).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.images.store import Image
from host_agent.containment import FORBIDDEN_CAPABILITIES
from tests.sandbox.test_egress_gate import create_in_world
from tests.sandbox.test_local_lifecycle import km
from tests.sandbox.world import ADDRESSES, World

pytestmark = pytest.mark.root
ALIAS = "privileged"
MIRROR_PORT = 8080
PACKAGE = "km-test-hello"
PROFILE = textwrap.dedent("""\
    apiVersion: klankermaker.ai/v1alpha1
    kind: SandboxProfile
    metadata: {name: privileged, prefix: pr}
    spec:
      lifecycle: {ttl: "2h", idleTimeout: "30m", teardownPolicy: destroy}
      runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
      execution: {shell: /bin/bash, workingDir: /workspace, privileged: true}
      network:
        enforcement: ebpf
        egress:
          allowedDNSSuffixes: [.allowed.test]
    """)
# Linux capability numbers, for reading CapBnd/CapEff masks.
CAPABILITY_NUMBERS = {
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_PTRACE": 19,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_BPF": 39,
    "CAP_PERFMON": 38,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_RAWIO": 17,
}
APT_ONLY_TEST_SOURCE = (
    "-o Dir::Etc::sourcelist=/etc/apt/sources.list.d/km-test.list -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0"
)


def agent_shell(script: str) -> subprocess.CompletedProcess[str]:
    """`sh -c script` as the sandbox user in the agent slice, as `km shell` starts it."""
    return km("shell", ALIAS, "--", "sh", "-c", script, check=False)


def as_root(script: str) -> subprocess.CompletedProcess[str]:
    """`script` as root through sudo from the agent's shell (what a privileged agent can do)."""
    return agent_shell(f"sudo -n sh -c {json.dumps(script)}")


def root_python(script: str) -> subprocess.CompletedProcess[str]:
    """A Python script (on stdin) as root through sudo from the agent's shell."""
    return km("shell", ALIAS, "--", "sudo", "-n", "python3", "-", check=False, stdin=script)


def build_repository(directory: Path) -> None:
    """A flat apt repository with one package: a script, and a unit that probes the network when started."""
    root = directory / "build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: km tests <km@example.invalid>\n"
        "Description: km test package\n a script and a service unit\n"
    )
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin" / PACKAGE).write_text("#!/bin/sh\necho hello from the package\n")
    (root / "usr/bin" / PACKAGE).chmod(0o755)
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    probe = "/usr/bin/python3 /usr/local/bin/net_probe"
    (root / f"usr/lib/systemd/system/{PACKAGE}.service").write_text(
        "[Service]\nType=oneshot\n"
        f"ExecStart=/bin/sh -c '{probe} connect {ADDRESSES['evil']} 80 > /var/tmp/{PACKAGE}.denied; "
        f"{probe} http allowed.test > /var/tmp/{PACKAGE}.allowed'\n"
    )
    deb = directory / f"{PACKAGE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    data = deb.read_bytes()
    control = (root / "DEBIAN/control").read_text()
    packages = (
        control.rstrip("\n") + f"\nFilename: ./{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    )
    (directory / "Packages").write_text(packages)
    listing = f" {hashlib.sha256(packages.encode()).hexdigest()} {len(packages.encode())} Packages\n"
    (directory / "Release").write_text(
        "Origin: km-tests\nLabel: km-tests\nSuite: stable\nCodename: km\nArchitectures: all amd64 arm64\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}\nSHA256:\n{listing}"
    )


@pytest.fixture(scope="module")
def mirror(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The repository, served over HTTP on the world's `allowed` address (only there: the world's namespace)."""
    directory = tmp_path_factory.mktemp("apt-repo")
    build_repository(directory)
    log = directory / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            ["ip", "netns", "exec", world.namespace, sys.executable, "-u", "-m", "http.server", str(MIRROR_PORT),
             "--bind", ADDRESSES["allowed"], "--directory", str(directory)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "Serving HTTP" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, f"the apt mirror did not start: {log.read_text()}"
            time.sleep(0.05)
        yield f"http://allowed.test:{MIRROR_PORT}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def privileged(world: World, debian_image: Image, mirror: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("privileged") / "privileged.yaml"
    profile.write_text(PROFILE)
    sandbox_id = create_in_world(profile, ALIAS)
    try:
        source = f"deb [trusted=yes] {mirror} ./\n"
        written = km("shell", ALIAS, "--root", "--", "sh", "-c", "cat > /etc/apt/sources.list.d/km-test.list", stdin=source)
        assert written.returncode == 0, written.stderr
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def capabilities(status_line: str) -> int:
    return int(status_line.split()[1], 16)


# ---- sudo works ------------------------------------------------------------------------------------


def test_sudo_works_in_km_shell_without_no_new_privs(privileged: str) -> None:
    result = agent_shell("grep NoNewPrivs /proc/self/status; sudo -n id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NoNewPrivs:", "0", "0"]


def test_sudo_works_in_an_agent_run(privileged: str) -> None:
    command = "sh -c 'sudo -n id -u; grep NoNewPrivs /proc/self/status'"
    run = km("agent", "run", ALIAS, "--prompt", "x", "--agent-cmd", command, "--wait", check=False)
    result = json.loads(run.stdout)
    assert result["status"] == "complete", (result["error"], result["result"])
    assert result["result"].split() == ["0", "NoNewPrivs:", "0"]


def test_sudo_apt_get_installs_a_package_from_an_allowed_source(privileged: str) -> None:
    result = agent_shell(
        f"sudo -n apt-get {APT_ONLY_TEST_SOURCE} update -q && sudo -n apt-get {APT_ONLY_TEST_SOURCE} install -y -q {PACKAGE}"
        f" && {PACKAGE}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("hello from the package")


def test_sudo_systemctl_status_and_editing_etc_and_usr_work(privileged: str) -> None:
    status = as_root("systemctl status km-host-agent.service | head -3")
    assert "Active: active (running)" in status.stdout, status.stdout + status.stderr
    edited = as_root("echo edited > /etc/km-test-file && cat /etc/km-test-file && touch /usr/local/bin/km-test-file && echo usr")
    assert edited.stdout.split() == ["edited", "usr"], edited.stderr


# ---- and root through sudo cannot leave the policy ------------------------------------------------


def test_root_holds_none_of_the_capabilities_that_reach_the_gate(privileged: str) -> None:
    lines = as_root("grep -E '^Cap(Bnd|Eff):' /proc/self/status").stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        mask = capabilities(line)
        for name in FORBIDDEN_CAPABILITIES:
            assert not mask & (1 << CAPABILITY_NUMBERS[name]), f"{name} in {line}"


def test_root_cannot_move_into_an_exempt_cgroup(privileged: str) -> None:
    for exempt in ("system.slice/km-host-agent.service", "kmoperator.slice", "system.slice", "init.scope"):
        result = as_root(f"echo $$ > /sys/fs/cgroup/unified/{exempt}/cgroup.procs && echo moved")
        assert "moved" not in result.stdout
        assert "Read-only file system" in result.stdout + result.stderr


def test_root_cannot_start_units_or_restart_the_host_agent(privileged: str) -> None:
    attempts = {
        "systemd-run": "systemd-run --wait true",
        "systemd-run --scope": "systemd-run --scope true",
        "systemctl start": "systemctl start kmoperator.slice",
        "systemctl restart": "systemctl restart km-host-agent.service",
        "systemctl stop": "systemctl stop km-host-agent.service",
        "daemon-reload": "systemctl daemon-reload",
        "busctl StartUnit": "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 "
        "org.freedesktop.systemd1.Manager StartUnit ss kmoperator.slice replace",
    }
    for name, command in attempts.items():
        result = as_root(command)
        assert result.returncode != 0, f"{name}: {result.stdout}"
    denied = as_root("systemctl start kmoperator.slice")
    assert "Access denied" in denied.stderr + denied.stdout
    assert km("status", ALIAS, "--json").returncode == 0
    assert as_root("systemctl is-active km-host-agent.service").stdout.strip() == "active"


def test_root_cannot_see_signal_or_ptrace_the_host_agent(privileged: str) -> None:
    def daemon_pid() -> str:
        shown = km("shell", ALIAS, "--root", "--", "systemctl", "show", "-p", "MainPID", "--value", "km-host-agent.service")
        return shown.stdout.strip()

    before = daemon_pid()
    seen = as_root("ps -e -o comm= | sort -u")
    assert "km-host-agent" not in seen.stdout
    assert "systemd" not in seen.stdout.split()  # not even PID 1 of the machine is visible
    attack = textwrap.dedent(f"""\
        import ctypes, os, signal
        pid = {before}
        try:
            print("comm", open(f"/proc/{{pid}}/comm").read().strip())
        except OSError as error:
            print("comm", error.errno)
        libc = ctypes.CDLL(None, use_errno=True)
        print("ptrace", libc.ptrace(16, pid, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH
        print("root", os.path.exists(f"/proc/{{pid}}/root/run/kmgate/allow4"))
        """)
    result = root_python(attack)
    assert "comm km-host-agent" not in result.stdout, result.stdout
    assert "root True" not in result.stdout
    assert int(result.stdout.split("ptrace ", 1)[1].split()[0]) == -1
    assert daemon_pid() == before  # still the same process, never restarted


def test_root_cannot_reach_the_gates_pinned_maps_or_load_bpf(privileged: str) -> None:
    script = textwrap.dedent("""\
        import ctypes, os, platform, struct
        libc = ctypes.CDLL(None, use_errno=True)
        print("pin", os.path.exists("/run/kmgate/allow4"))
        path = ctypes.create_string_buffer(b"/run/kmgate/allow4")
        attr = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(path), 0, 0), 128)
        fd = libc.syscall({"x86_64": 321, "aarch64": 280}[platform.machine()], 7, attr, 128)  # bpf(BPF_OBJ_GET)
        print("obj_get", fd, ctypes.get_errno())
        """)
    result = root_python(script)
    assert result.stdout.splitlines()[0] == "pin False", result.stdout + result.stderr
    assert int(result.stdout.split("obj_get ", 1)[1].split()[0]) < 0, result.stdout


def test_root_cannot_change_the_host_agents_code_config_or_units(privileged: str) -> None:
    targets = [
        "/opt/km/venv/km-test",
        "/etc/km/host-agent.json",
        "/etc/systemd/system/km-host-agent.service",
        "/etc/systemd/system/km-host-agent.service.d/override.conf",
        "/etc/systemd/system/service.d/override.conf",
        "/etc/systemd/system/km-.service.d/override.conf",
        "/usr/lib/systemd/system/km-host-agent.service.d/override.conf",
        "/etc/systemd/system.control/km-host-agent.service",
        "/etc/systemd/system-generators/km-test",
        "/etc/systemd/system.conf",
        "/etc/ld.so.preload",
        "/var/lib/km/boot-status",
    ]
    for target in targets:
        result = as_root(f"echo x >> {target} && echo written")
        assert "written" not in result.stdout, target


def test_root_cannot_mount_or_open_other_socket_families(privileged: str) -> None:
    mounts = as_root(
        "mount -t bpf bpf /mnt; mount -t cgroup2 cgroup2 /mnt; mount -t tmpfs tmpfs /mnt; grep -c ' /mnt ' /proc/mounts"
    )
    assert mounts.stdout.strip().splitlines()[-1] == "0"
    script = textwrap.dedent("""\
        import socket
        attempts = ((socket.AF_PACKET, socket.SOCK_RAW, 0), (socket.AF_VSOCK, socket.SOCK_STREAM, 0),
                    (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), (socket.AF_ALG, socket.SOCK_SEQPACKET, 0),
                    (socket.AF_NETLINK, socket.SOCK_RAW, 9), (socket.AF_NETLINK, socket.SOCK_RAW, 16))  # audit, generic
        for family, kind, protocol in attempts:
            try:
                socket.socket(family, kind, protocol)
                print("created", family, protocol)
            except OSError as error:
                print("refused", family, protocol, error.errno)
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()  # route: what ip and getaddrinfo use
        print("route netlink ok")
        """)
    result = root_python(script)
    assert "created" not in result.stdout, result.stdout
    refused = [line.split() for line in result.stdout.splitlines() if line.startswith("refused")]
    assert len(refused) == 6, result.stdout + result.stderr
    # other families: EPERM; netlink other than route: absent (EPROTONOSUPPORT), or sudo itself would fail
    assert [line[-1] for line in refused] == ["1", "1", "1", "1", "93", "93"], result.stdout
    assert "route netlink ok" in result.stdout


def test_root_is_gated_and_an_allowed_name_still_connects(privileged: str) -> None:
    denied = as_root(f"python3 /usr/local/bin/net_probe connect {ADDRESSES['evil']} 80")
    assert denied.stdout.strip() == "errno 1"
    allowed = as_root("python3 /usr/local/bin/net_probe http allowed.test")
    assert allowed.stdout.strip() == f"hello from {ADDRESSES['allowed']}"


def test_a_service_root_installed_runs_gated(privileged: str) -> None:
    installed = agent_shell(
        f"dpkg -s {PACKAGE} >/dev/null 2>&1 || sudo -n apt-get {APT_ONLY_TEST_SOURCE} install -y -q {PACKAGE}"
    )
    if installed.returncode != 0:  # the install test did not run first: install it now
        agent_shell(f"sudo -n apt-get {APT_ONLY_TEST_SOURCE} update -q")
        assert agent_shell(f"sudo -n apt-get {APT_ONLY_TEST_SOURCE} install -y -q {PACKAGE}").returncode == 0
    assert as_root(f"systemctl start {PACKAGE}.service").returncode != 0  # the agent cannot start it
    started = km("shell", ALIAS, "--root", "--", "sh", "-c", f"systemctl daemon-reload && systemctl start {PACKAGE}.service")
    assert started.returncode == 0, started.stderr  # the operator can; it runs in system.slice
    results = km("shell", ALIAS, "--root", "--", "sh", "-c", f"cat /var/tmp/{PACKAGE}.denied /var/tmp/{PACKAGE}.allowed")
    assert results.stdout.splitlines() == ["errno 1", f"hello from {ADDRESSES['allowed']}"]


def test_the_operators_root_shell_is_not_gated(privileged: str) -> None:
    result = km("shell", ALIAS, "--root", "--", "sh", "-c", "tail -1 /proc/self/cgroup")
    assert result.stdout.strip().startswith("0::/kmoperator.slice/")
    reached = km("shell", ALIAS, "--root", "--", "python3", "/usr/local/bin/net_probe", "connect", ADDRESSES["unlisted"], "80")
    assert reached.stdout.strip() == "ok"


def test_only_the_daemon_and_the_operator_slice_are_exempt_once_first_boot_finished(privileged: str) -> None:
    exempt = json.loads(km("status", ALIAS, "--json").stdout)["host_agent"]["gate"]["exempt"]
    assert sorted(path.rsplit("/unified/", 1)[-1] for path in exempt) == [
        "kmoperator.slice",
        "system.slice/km-host-agent.service",
    ]


def test_the_agents_environment_is_the_sandbox_users(privileged: str) -> None:
    result = agent_shell('echo "$HOME $USER $LOGNAME"; id -un')
    assert result.stdout.split() == ["/home/sandbox", "sandbox", "sandbox", "sandbox"]
