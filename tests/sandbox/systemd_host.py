"""A host whose PID 1 is systemd, for testing km's systemd launcher on machines that have none.

When this host was booted by systemd, the tests simply run here. Otherwise (CI: PID 1 is not
systemd) they run inside a test host: a privileged nspawn machine booted from an overlay of the
baked debian-12 image plus `systemd-container` and `nftables` (apt, in a chroot), with full cgroup v2
inside, its own network namespace, and the repository, the virtualenv, its Python and the image store
bind-mounted at the same paths. km then runs inside it as a unit of that systemd, so its sandboxes
are nested nspawn machines started by a real systemd through `systemd-run`.

The test host's machine name and cgroups (`km-systemd-host-<hex>`) are not shaped like a sandbox id,
so no `km doctor` on this host takes it for a leftover.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller.substrates.local import machine
from controller.substrates.local.systemd_launch import systemd_booted
from tests.conftest import REPO_ROOT

HOST_PACKAGES = ("systemd-container", "nftables")
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
KM_ENV = ("KM_STATE_DIR", "KM_SANDBOX_DIR", "KM_IMAGE_DIR")


class SystemdHostError(Exception):
    """The nested systemd host could not be built or booted; the message has the command and its output."""


@dataclass(frozen=True)
class SystemdHost:
    """Where km's commands run: here (leader None) or inside the nested host through its systemd."""

    leader_pid: int | None
    env: dict[str, str]
    working_dir: Path

    def run(self, argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        if self.leader_pid is None:
            return subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env}, check=False
            )
        command = ["nsenter", "-t", str(self.leader_pid), "-a", "systemd-run", "--quiet", "--collect", "--wait", "--pipe"]
        command += [f"--setenv={key}={value}" for key, value in self.env.items()]
        command += [f"--working-directory={self.working_dir}", "--", *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@contextmanager
def systemd_host(image_rootfs: Path, workdir: Path) -> Iterator[SystemdHost]:
    """This host if systemd runs it, else a nested one booted from `image_rootfs`, removed on exit."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = {key: os.environ[key] for key in KM_ENV if key in os.environ}
    if systemd_booted():
        yield SystemdHost(None, env, data)
        return
    env = {
        "KM_STATE_DIR": str(data / "state"),
        "KM_SANDBOX_DIR": str(data / "sandboxes"),
        "KM_IMAGE_DIR": str(image_rootfs.parents[1]),
        "PYTHONPATH": str(REPO_ROOT),  # km inside runs the very code under test (and finds the image it baked)
    }
    name = f"km-systemd-host-{secrets.token_hex(4)}"
    root = workdir / "root"
    cgroups = _cgroup_dirs(name)
    process: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    try:
        _make_root(image_rootfs, workdir)
        machine.ensure_host_mounts()
        for directory in cgroups:
            directory.mkdir()
        process, leader = _boot(name, root, [data, REPO_ROOT, *_python_dirs()], [Path(env["KM_IMAGE_DIR"])], workdir, cgroups)
        host = SystemdHost(leader, env, data)
        state = host.run(["systemctl", "is-system-running", "--wait"], timeout=120).stdout.strip()
        if state not in ("running", "degraded"):
            raise SystemdHostError(f"the test host's systemd is {state!r}:\n{machine.console_tail(workdir / 'console.log')}")
        yield host
    finally:
        if process is not None:
            machine.stop(process.pid, leader, name, timeout=30)
        for directory in reversed(cgroups):
            machine.remove_cgroup(directory)
        if machine.is_mountpoint(root):
            subprocess.run(["umount", "--recursive", str(root)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)


def _make_root(image_rootfs: Path, workdir: Path) -> None:
    """An overlay of the image with the host packages installed, and the sandbox-only units masked."""
    root = workdir / "root"
    for directory in (workdir / "upper", workdir / "work", root):
        directory.mkdir(exist_ok=True)
    options = f"lowerdir={image_rootfs},upperdir={workdir / 'upper'},workdir={workdir / 'work'}"
    _checked(["mount", "-t", "overlay", "overlay", "-o", options, str(root)])
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    install = f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {' '.join(HOST_PACKAGES)}"
    chroot = f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && chroot {root} sh -c '{install}'"
    _checked(["unshare", "--mount", "sh", "-c", chroot], timeout=600)
    for unit in ("km-firstboot.service", "km-host-agent.service"):
        mask = root / "etc/systemd/system" / unit
        mask.unlink(missing_ok=True)
        mask.symlink_to("/dev/null")


def _boot(
    name: str, root: Path, binds: list[Path], read_only: list[Path], workdir: Path, cgroups: list[Path]
) -> tuple[subprocess.Popen[bytes], int]:
    argv = [
        "systemd-nspawn",
        f"--directory={root}",
        "--boot",
        f"--machine={name}",
        "--register=no",
        "--keep-unit",
        "--private-network",  # the sandboxes' veths and NAT rules stay inside the test host
        "--capability=all",  # nspawn, mounts and nftables inside
        "--system-call-filter=bpf perf_event_open",  # the nested sandboxes' host agents load BPF
        "--console=read-only",
        "--notify-ready=yes",
        "--link-journal=no",
        "--timezone=off",
        "--resolv-conf=off",
    ]
    argv += [f"--bind={path}" for path in _distinct(binds)]
    argv += [f"--bind-ro={path}" for path in _distinct(read_only)]
    notify_path = workdir / "notify.sock"
    # On a hybrid host nspawn would give this machine legacy cgroups only; km needs cgroup2, and a
    # systemd host today runs the unified hierarchy.
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(0.25)
        with (workdir / "console.log").open("ab") as console:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=lambda: _join(cgroups),
            )
        leader = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                message = notify_socket.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            for line in message.splitlines():
                if line.startswith("X_NSPAWN_LEADER_PID="):
                    leader = int(line.split("=", 1)[1])
                if line == "READY=1" and leader is not None:
                    return process, leader
    tail = machine.console_tail(workdir / "console.log")
    machine.stop(process.pid, leader, name, timeout=10)
    raise SystemdHostError(f"the test host did not boot (nspawn exit {process.poll()}):\n{tail}")


def _join(cgroups: list[Path]) -> None:
    """Start the test host in cgroups of its own, so it never shares a payload cgroup with a sandbox."""
    for directory in cgroups:
        (directory / "cgroup.procs").write_text("0")


def _python_dirs() -> list[Path]:
    """The virtualenv and the Python it was made from, which may live outside it."""
    return [Path(sys.prefix), Path(sys.base_prefix).resolve()]


def _distinct(paths: list[Path]) -> list[Path]:
    """Each path once, and none that lies inside another one already bound."""
    chosen: list[Path] = []
    for path in sorted({path.resolve() for path in paths}, key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(parent) for parent in chosen):
            chosen.append(path)
    return chosen


def _cgroup_dirs(name: str) -> list[Path]:
    if CGROUP_HIERARCHIES[1].is_dir():
        return [hierarchy / name for hierarchy in CGROUP_HIERARCHIES]
    return [Path("/sys/fs/cgroup") / name]


def _checked(argv: list[str], timeout: float = 60) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise SystemdHostError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
