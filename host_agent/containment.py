"""What keeps the agent, and root inside the agent's units, inside the egress policy: one place for the
systemd settings of every agent unit (km's tmux server, `km shell`), the wrapper they start through,
and which cgroups the gate leaves alone.

The agent may be root (`sudo` in a privileged profile), so uid 0 alone must not be a way out. Each
agent unit is started by systemd *as root*, with these settings, and only then becomes the `sandbox`
user through `setpriv`:

- The seccomp filters (systemd's RestrictAddressFamilies, and km's own socket filter, which answers
  EPERM and also looks at netlink protocols: host_agent/socket_filter.py) are installed while the unit
  still holds CAP_SYS_ADMIN, so no `no_new_privs` is needed (systemd must set it for a `User=` unit),
  and `sudo` works. They are inherited by everything the agent starts and cannot be removed.
- A bounding set without the capabilities that could leave the policy (mount, cgroup moves through
  CAP_SYS_ADMIN, BPF, raw sockets, ptrace, module loading, reboot, ...), so root after `sudo` has
  none of them either.
- A PID namespace of its own (`unshare --pid`): the agent cannot see, signal, ptrace or enter the host
  agent, PID 1 or any other machine service through /proc.
- A mount namespace in which cgroupfs is read-only, the gate's pinned maps, PID 1's private socket and
  the daemon's state are hidden, and km's own code, units, the drop-in directories that would apply to
  them and the files that decide what PID 1 runs at boot are read-only.

PID 1 trusts any root caller on its private socket and on the system bus, so the agent's units see
neither: the private socket is hidden, and at the bus's path they find the host agent's read-only bus
(host_agent/readonly_bus.py), so `sudo systemctl status` works and `sudo systemctl start` or `systemd-run`
does not. Machine services started by PID 1 are gated like the agent (only the units named here are
not), so a package's own service that root installs runs under the policy too.

Standard library only: the operator side imports it to start `km shell` with the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Final

AGENT_SLICE: Final = "kmagent.slice"
# `km shell --root` and the operator's other root commands: exempt, and out of the agent's reach
# (starting units is not something the agent can do).
OPERATOR_SLICE: Final = "kmoperator.slice"
HOST_AGENT_UNIT: Final = "km-host-agent.service"
# The unit that runs the sandbox's userdata (and so the profile's initCommands) at first boot: km's own
# on local images, cloud-init's last stage on EC2. Exempt only until first boot has finished.
FIRST_BOOT_UNITS: Final = ("km-firstboot.service", "cloud-final.service")
# Machine services that must reach the network outside the profile's allowlist for the machine to
# stay usable, by substrate: on EC2 the operator's channel (SSM agent, which also reads instance
# metadata), DHCP renewals and time sync. Nothing in the agent's units can enter their cgroups.
MACHINE_SERVICES_UNGATED: Final[dict[str, tuple[str, ...]]] = {
    "ec2": (
        "amazon-ssm-agent.service",
        "snap.amazon-ssm-agent.amazon-ssm-agent.service",
        "systemd-networkd.service",
        "chronyd.service",
        "systemd-timesyncd.service",
    ),
    "local": (),
}

# Capabilities root keeps inside an agent unit: enough for package managers (files, owners, modes,
# file capabilities, dropping to _apt) and nothing that reaches the gate, cgroups, mounts or the kernel.
AGENT_CAPABILITIES: Final = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_LEASE",
    "CAP_IPC_LOCK",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
)
# Named so a test can check each is really gone after sudo (issue 14's list, plus reboot).
FORBIDDEN_CAPABILITIES: Final = (
    "CAP_SYS_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_MODULE",
    "CAP_SYS_BOOT",
    "CAP_SYS_RAWIO",
)
AGENT_ADDRESS_FAMILIES: Final = ("AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6")

# Hidden from the agent's units: the gate's maps (BPF_OBJ_GET needs only file access since 6.5), any
# other bpffs, PID 1's private socket (it trusts every root caller there; systemctl then falls back to
# the read-only bus), the daemon's control socket and state, the sandbox's configuration (including the
# collector's credentials), and tracing.
HIDDEN_PATHS: Final = (
    "/run/kmgate",
    "/sys/fs/bpf",
    "/run/systemd/private",
    "/run/km-host-agent",
    "/var/lib/km-host-agent",
    "/etc/km",
    "/sys/kernel/tracing",
    "/sys/kernel/debug",
)

_UNIT_DIRECTORIES: Final = ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system")
# Drop-in directories that would apply to km's units: their own, the name-prefix ones (`km-.service.d`
# applies to every km-*.service) and the top-level ones that apply to every unit of a type.
_KM_DROP_INS: Final = (
    "km-host-agent.service.d",
    "km-host-.service.d",
    "km-.service.d",
    "km-firstboot.service.d",
    "km-agent-tmux.service.d",
    "km-agent-.service.d",
    "run-kmgate.mount.d",
    "run-.mount.d",
    "kmagent.slice.d",
    "kmoperator.slice.d",
    "service.d",
    "mount.d",
    "slice.d",
)
KM_UNIT_FILES: Final = (
    "km-host-agent.service",
    "km-agent-tmux.service",
    "km-firstboot.service",
    "run-kmgate.mount",
    "kmoperator.slice",
)
# Read-only for the agent's units, so root there cannot change what the exempt daemon runs or how PID 1
# starts it at the next boot. Everything in MADE_AT_START is created by the host agent when missing, before
# it opens the read-only bus that every agent unit needs: a read-only mount needs something to mount over,
# or root could create the path itself.
MADE_AT_START: Final = tuple(str(PurePosixPath(base) / name) for base in _UNIT_DIRECTORIES for name in _KM_DROP_INS) + (
    "/etc/systemd/system.control",
    "/etc/systemd/system.conf.d",
    "/etc/systemd/system-generators",
    "/usr/local/lib/systemd/system-generators",
)
# An empty file, made at start, so nobody can make every process at the next start load a library.
LD_PRELOAD_FILE: Final = "/etc/ld.so.preload"
READ_ONLY_PATHS: Final = (
    "/run/km-bus",  # else root could put the real bus where the next unit's bus comes from
    "/opt/km",
    "/usr/local/bin/km-host-agent",
    "/var/lib/km",
    *(str(PurePosixPath("/etc/systemd/system") / name) for name in KM_UNIT_FILES),
    *MADE_AT_START,
    "/etc/systemd/system.conf",
    "/usr/lib/systemd/system-generators",
    LD_PRELOAD_FILE,
)
# The read-only bus (host_agent/readonly_bus.py) stands in for the system bus. No `-`: a unit whose bus
# cannot be replaced fails to start rather than getting the real one.
BUS_BINDING: Final = "/run/km-bus/system_bus_socket:/run/dbus/system_bus_socket"

# The unit's own bounding set has CAP_SYS_ADMIN too, for the first two steps alone: `unshare` gives the
# agent its own PID namespace (and a /proc that shows only it), and the socket filter
# (host_agent/socket_filter.py) needs it to install without no_new_privs. `setpriv` then narrows the
# bounding set to AGENT_CAPABILITIES and becomes the sandbox user, before the agent's first program.
HOST_AGENT_COMMAND: Final = "/usr/local/bin/km-host-agent"
_ENTER_AGENT: Final = (
    "/usr/bin/unshare",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "--",
    HOST_AGENT_COMMAND,
    "socket-filter",
    "--",
    "/usr/bin/setpriv",
    "--bounding-set=-all," + ",".join("+" + name.removeprefix("CAP_").lower() for name in AGENT_CAPABILITIES),
    "--inh-caps=-all",
    "--reuid=sandbox",
    "--regid=sandbox",
    "--init-groups",
    "--",
)
AGENT_ENVIRONMENT: Final = ("HOME=/home/sandbox", "USER=sandbox", "LOGNAME=sandbox")


def prepare_read_only_targets(root: Path = Path("/")) -> None:
    """Make the paths the agent's units mount read-only over, where they are missing (root only)."""
    for directory in MADE_AT_START:
        (root / directory.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
    preload = root / LD_PRELOAD_FILE.lstrip("/")
    if not preload.exists():
        preload.touch(mode=0o644)


def agent_unit_properties() -> list[str]:
    """The systemd settings of every agent unit, as `Name=value` lines (a unit file's or systemd-run's)."""
    return [
        f"CapabilityBoundingSet={' '.join(AGENT_CAPABILITIES)} CAP_SYS_ADMIN",
        f"RestrictAddressFamilies={' '.join(AGENT_ADDRESS_FAMILIES)}",
        "ProtectControlGroups=yes",
        "InaccessiblePaths=" + " ".join(f"-{path}" for path in HIDDEN_PATHS),
        "ReadOnlyPaths=" + " ".join(f"-{path}" for path in READ_ONLY_PATHS),
        f"BindReadOnlyPaths={BUS_BINDING}",
        "Environment=" + " ".join(AGENT_ENVIRONMENT),
    ]


def as_agent(argv: Sequence[str]) -> list[str]:
    """argv run as the sandbox user in a PID namespace of its own (the unit itself runs as root)."""
    return [*_ENTER_AGENT, *argv]


def exempt_unit_names(substrate: str, first_boot_done: bool) -> list[str]:
    """The units whose cgroups the gate leaves alone, besides the daemon's own and the operator slice."""
    names = list(MACHINE_SERVICES_UNGATED.get(substrate, ()))
    if not first_boot_done:
        names += FIRST_BOOT_UNITS
    return names
