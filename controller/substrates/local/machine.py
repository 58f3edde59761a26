"""One local sandbox machine: an overlay root over a baked image, booted by `systemd-nspawn -b`.

Measured on this machine kind (reference/local-substrate.md, nspawn-bcc.md) and handled here:
- no systemd or D-Bus on the host → `--register=no --keep-unit`, and km supervises nspawn itself;
- `/run` is not a tmpfs → a tmpfs on `/run/systemd/nspawn`;
- bpf() is refused inside without `--system-call-filter='bpf perf_event_open'`;
- machines started from one cgroup share their payload cgroup → each gets its own, in every hierarchy;
- nspawn must never be SIGKILLed alone (its systemd would be orphaned) → SIGTERM, then the leader.
Commands run inside through the machine's own systemd (`systemd-run`), never a bare `nsenter`, which
would escape the machine's seccomp filter and cgroups.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.substrates.local.network import SandboxNetwork
from host_agent import containment

CGROUP_HYBRID_UNIFIED = Path("/sys/fs/cgroup/unified")
CGROUP_HYBRID_SYSTEMD = Path("/sys/fs/cgroup/systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_RUN_DIR = Path("/run/systemd/nspawn")
Progress = Callable[[str], None]


class MachineError(Exception):
    """A machine could not be started, stopped or entered; the message says why and what to look at."""


@dataclass(frozen=True)
class MachineSpec:
    sandbox_id: str
    hostname: str
    image_rootfs: Path
    directory: Path
    network: SandboxNetwork
    binds: Sequence[tuple[Path, str]] = field(default_factory=tuple)

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"


def cgroup_dirs(sandbox_id: str) -> list[Path]:
    """The machine's own cgroup in every hierarchy nspawn uses on this host."""
    name = f"km-nspawn-{sandbox_id}"
    if CGROUP_HYBRID_UNIFIED.is_dir():
        return [CGROUP_HYBRID_SYSTEMD / name, CGROUP_HYBRID_UNIFIED / name]
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        return [CGROUP_ROOT / name]
    raise MachineError("no cgroup2 hierarchy on this host: the local substrate needs cgroup v2 (or the hybrid layout)")


def require_cgroup2() -> None:
    cgroup_dirs("probe")


def unified_cgroup(sandbox_id: str) -> Path:
    return cgroup_dirs(sandbox_id)[-1]


def mount_rootfs(spec: MachineSpec) -> None:
    """The sandbox's disk: a persistent upper layer over the read-only image."""
    upper, work = spec.directory / "upper", spec.directory / "work"
    for directory in (upper, work, spec.rootfs):
        directory.mkdir(parents=True, exist_ok=True)
    if is_mountpoint(spec.rootfs):
        return
    options = f"lowerdir={spec.image_rootfs},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(spec.rootfs)], "mounting the sandbox's root")


def unmount_rootfs(spec: MachineSpec) -> None:
    if is_mountpoint(spec.rootfs):
        _run(["umount", str(spec.rootfs)], "unmounting the sandbox's root")


def boot(spec: MachineSpec, timeout: float, progress: Progress = lambda _: None) -> tuple[int, int]:
    """Start the machine and wait for its systemd's READY=1; returns (nspawn pid, leader pid)."""
    ensure_host_mounts()
    cgroups = cgroup_dirs(spec.sandbox_id)
    for directory in cgroups:
        directory.mkdir(exist_ok=True)
    notify_path = spec.directory / "notify.sock"
    notify_path.unlink(missing_ok=True)
    argv = nspawn_command(spec)
    spec.console_log.touch()
    offset = spec.console_log.stat().st_size  # report only this boot's lines
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(0.25)
        with spec.console_log.open("ab") as console:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                start_new_session=True,
                preexec_fn=lambda: _join_cgroups(cgroups),
            )
        try:
            leader = _wait_ready(process, notify_socket, spec, timeout, progress, offset)
        except BaseException:
            stop(process.pid, None, spec.sandbox_id, timeout=10)
            raise
        finally:
            notify_path.unlink(missing_ok=True)
    return process.pid, leader


def nspawn_command(spec: MachineSpec, register: bool = False) -> list[str]:
    """nspawn's argv; `register` lets it register with systemd-machined (only where the host runs systemd)."""
    argv = [
        "systemd-nspawn",
        f"--directory={spec.rootfs}",
        "--boot",
        f"--machine={spec.sandbox_id}",
        f"--hostname={spec.hostname}",
        f"--register={'yes' if register else 'no'}",
        "--keep-unit",
        "--console=read-only",
        "--notify-ready=yes",
        "--link-journal=no",
        "--resolv-conf=copy-host",
        "--timezone=off",
        f"--network-namespace-path={spec.network.namespace_path}",
        # NET_ADMIN is not implied with a given namespace; BPF and PERFMON let the agent drop SYS_ADMIN.
        "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
        "--system-call-filter=bpf perf_event_open",
    ]
    argv += [f"--bind={source}:{target}" for source, target in spec.binds]
    return argv


def _wait_ready(
    process: subprocess.Popen[bytes],
    notify_socket: socket.socket,
    spec: MachineSpec,
    timeout: float,
    progress: Progress,
    offset: int,
) -> int:
    deadline = time.monotonic() + timeout
    leader: int | None = None
    seen = offset
    while time.monotonic() < deadline:
        seen = report_console(spec.console_log, seen, progress)
        if process.poll() is not None:
            raise MachineError(
                f"systemd-nspawn exited with {process.returncode} before the machine was ready:\n{console_tail(spec.console_log)}"
            )
        try:
            message = notify_socket.recv(4096).decode(errors="replace")
        except TimeoutError:
            continue
        for line in message.splitlines():
            if line.startswith("X_NSPAWN_LEADER_PID="):
                leader = int(line.split("=", 1)[1])
            if line == "READY=1" and leader is not None:
                report_console(spec.console_log, seen, progress)
                return leader
    raise MachineError(f"the machine did not finish booting within {timeout:.0f}s:\n{console_tail(spec.console_log)}")


def report_console(console_log: Path, seen: int, progress: Progress) -> int:
    """Pass first-boot progress lines (userdata and initCommands) on to the operator."""
    try:
        with console_log.open("rb") as stream:
            stream.seek(seen)
            chunk = stream.read()
    except FileNotFoundError:
        return seen
    complete = chunk.rfind(b"\n") + 1
    for raw in chunk[:complete].decode(errors="replace").splitlines():
        if "km-userdata:" in raw or "km-init:" in raw:
            progress(raw[raw.find("km-") :].strip())
    return seen + complete


def is_running(nspawn_pid: int | None, sandbox_id: str) -> bool:
    if not nspawn_pid:
        return False
    try:
        cmdline = Path(f"/proc/{nspawn_pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{nspawn_pid}/stat").read_text()
    except OSError:
        return False
    zombie = status.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and f"--machine={sandbox_id}".encode() in cmdline


def process_command_lines() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process on the host that can still be read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                yield int(entry.name), raw.rstrip(b"\0").decode(errors="replace").split("\0")


def nspawn_processes() -> dict[str, int]:
    """Sandbox id → pid of every km machine's nspawn, found by its command line.

    Only nspawns in km's own PID namespace count: one inside a container belongs to the km running
    in that container (a systemd test host, an operator's nested setup), not to this one.
    """
    found = {}
    own_namespace = _pid_namespace("self")
    for pid, argv in process_command_lines():
        if argv[0].endswith("systemd-nspawn") and _pid_namespace(str(pid)) == own_namespace:
            for argument in argv:
                if argument.startswith("--machine="):
                    found[argument.removeprefix("--machine=")] = pid
    return found


def _pid_namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def find_nspawn_pid(sandbox_id: str) -> int | None:
    """The nspawn process of a machine (for a create killed before it recorded the pid)."""
    return nspawn_processes().get(sandbox_id)


def stop(nspawn_pid: int | None, leader_pid: int | None, sandbox_id: str, timeout: float = 30) -> None:
    """Halt the machine (SIGTERM → its systemd powers off); kill its PID 1 first if it will not stop."""
    if not is_running(nspawn_pid, sandbox_id):
        nspawn_pid = find_nspawn_pid(sandbox_id)
    if is_running(nspawn_pid, sandbox_id):
        assert nspawn_pid is not None
        leader_pid = leader_pid or _child_of(nspawn_pid)
        thaw(sandbox_id)
        os.kill(nspawn_pid, signal.SIGTERM)
        if not _wait_gone(nspawn_pid, sandbox_id, timeout):
            if leader_pid:
                _kill_quietly(leader_pid)  # the machine's PID 1 first, so its systemd is never orphaned
            if not _wait_gone(nspawn_pid, sandbox_id, 5):
                _kill_quietly(nspawn_pid)
                _wait_gone(nspawn_pid, sandbox_id, 5)
    for directory in reversed(cgroup_dirs(sandbox_id)):
        remove_cgroup(directory)


def freeze(sandbox_id: str) -> None:
    (unified_cgroup(sandbox_id) / "cgroup.freeze").write_text("1")


def thaw(sandbox_id: str) -> None:
    freeze_file = unified_cgroup(sandbox_id) / "cgroup.freeze"
    if freeze_file.exists():
        freeze_file.write_text("0")


def is_frozen(sandbox_id: str) -> bool:
    events = unified_cgroup(sandbox_id) / "cgroup.events"
    return events.exists() and "frozen 1" in events.read_text()


def run_inside(
    leader_pid: int,
    argv: Sequence[str],
    *,
    user: str | None = "sandbox",
    working_dir: str | None = None,
    in_agent_slice: bool = True,
    tty: bool = False,
    capture: bool = True,
    input_text: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv as a transient unit of the machine's systemd: in the agent slice, as the sandbox user and
    contained as agent runs are (host_agent/containment.py), or as `user` in the operator's slice."""
    command = ["nsenter", "-t", str(leader_pid), "-a", "systemd-run", "--quiet", "--collect", "--wait"]
    command.append("--pty" if tty else "--pipe")
    if working_dir:
        command.append(f"--working-directory={working_dir}")
    if in_agent_slice:
        # Started as root so the unit's filters need no no_new_privs (sudo works), then the sandbox user.
        command.append(f"--slice={containment.AGENT_SLICE}")
        command += [f"--property={setting}" for setting in containment.agent_unit_properties()]
        command += ["--", *containment.as_agent(argv)]
    else:
        command.append(f"--slice={containment.OPERATOR_SLICE}")
        if user:
            command.append(f"--uid={user}")
        command += ["--", *argv]
    return subprocess.run(command, input=input_text, capture_output=capture, text=True, timeout=timeout, check=False)


def login_shell_command(command: Sequence[str] | None) -> list[str]:
    """bash as a login shell, so the profile environment in /etc/profile.d applies."""
    if not command:
        return ["/bin/bash", "--login"]
    return ["/bin/bash", "--login", "-c", shlex.join(command)]


def ensure_host_mounts() -> None:
    """nspawn refuses to work under /run/systemd/nspawn unless it is a tmpfs, which hosts without systemd lack."""
    NSPAWN_RUN_DIR.mkdir(parents=True, exist_ok=True)
    if not is_mountpoint(NSPAWN_RUN_DIR) and not _run_dir_is_tmpfs():
        _run(["mount", "-t", "tmpfs", "tmpfs", str(NSPAWN_RUN_DIR)], "mounting a tmpfs on /run/systemd/nspawn")


def _run_dir_is_tmpfs() -> bool:
    result = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", "/run"], capture_output=True, text=True)
    return result.stdout.strip() == "tmpfs"


def _join_cgroups(cgroups: list[Path]) -> None:
    for directory in cgroups:
        (directory / "cgroup.procs").write_text("0")


def _wait_gone(pid: int, sandbox_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when we are the parent (tests, `km create` itself)
        except ChildProcessError:
            pass
        if not is_running(pid, sandbox_id):
            return True
        time.sleep(0.05)
    return False


def _child_of(pid: int) -> int | None:
    """nspawn's child is the machine's PID 1 (known even before READY reports it)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def remove_cgroup(directory: Path, timeout: float = 10) -> None:
    """Remove a machine's cgroup tree once nspawn is gone, killing stragglers (cgroup.kill) first."""
    if not directory.is_dir():
        return
    kill = directory / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while directory.is_dir() and time.monotonic() < deadline:
        for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                child.rmdir()
            except OSError:
                pass
        try:
            directory.rmdir()
        except OSError:
            time.sleep(0.05)  # processes are still leaving it


def is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def console_tail(file: Path, lines: int = 30) -> str:
    try:
        return "\n".join(file.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no console output)"


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MachineError(f"{what} failed: `{' '.join(argv)}`: {result.stderr.strip()}")
