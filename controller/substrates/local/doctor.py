"""`km doctor --local`: find (and with --fix remove) what local sandboxes left on this host.

Everything a local sandbox makes carries its id in its name: the network namespace `km-<id>`, the
veth `kmv-<hex>`, the nftables rules commented `km:<id>` (NAT and the link's filter rules), the cgroups
`km-nspawn-<id>` (or, on a host run by systemd, the unit `km-sandbox-<id>.service`), the overlay mount
and the directory under the sandbox root. Anything of that shape whose id has no record in the
state store is an orphan: a killed create, a crashed km, a deleted state file.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from controller.state import StateStore
from controller.substrates.local import machine, systemd_launch
from controller.substrates.local.network import km_rules

_ID = r"[a-z][a-z0-9]{0,11}-[a-f0-9]{8}"


@dataclass(frozen=True)
class Leftover:
    kind: str  # netns, veth, nft-rule, unit, cgroup, mount, directory, process
    sandbox_id: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "sandbox_id": self.sandbox_id, "detail": self.detail}


def find_leftovers(store: StateStore, sandbox_root: Path) -> list[Leftover]:
    known = {record.sandbox_id for record in store.list()}
    suffixes = {sandbox_id.rsplit("-", 1)[-1] for sandbox_id in known}
    found: list[Leftover] = []
    for name in _netns_names():
        match = re.fullmatch(rf"km-({_ID})", name)
        if match and match.group(1) not in known:
            found.append(Leftover("netns", match.group(1), name))
    for name in _link_names():
        match = re.fullmatch(r"kmv-([a-f0-9]{8})", name)
        if match and match.group(1) not in suffixes:
            found.append(Leftover("veth", match.group(1), name))
    for rule in km_rules():
        if rule.sandbox_id not in known:
            found.append(Leftover("nft-rule", rule.sandbox_id, rule.describe()))
    for hierarchy in (machine.CGROUP_HYBRID_UNIFIED, machine.CGROUP_HYBRID_SYSTEMD, machine.CGROUP_ROOT):
        for directory in sorted(hierarchy.glob("km-nspawn-*")) if hierarchy.is_dir() else []:
            sandbox_id = directory.name.removeprefix("km-nspawn-")
            if sandbox_id not in known:
                found.append(Leftover("cgroup", sandbox_id, str(directory)))
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1]
        match = re.fullmatch(rf"{re.escape(str(sandbox_root))}/({_ID})/(?:rootfs|volumes/[^/]+)", target)
        if match and match.group(1) not in known:
            found.append(Leftover("mount", match.group(1), target))
    if sandbox_root.is_dir():
        deleting = _paths_being_deleted()
        for directory in sorted(sandbox_root.iterdir()):
            match = re.fullmatch(rf"(?:\.trash-)?({_ID})(?:-\d+)?", directory.name)
            if not match or str(directory) in deleting:
                continue  # a destroyed sandbox's disk that its background `rm` is still deleting
            if directory.name.startswith(".trash-") or match.group(1) not in known:
                found.append(Leftover("directory", match.group(1), str(directory)))
    units = systemd_launch.leftover_units() if systemd_launch.systemd_booted() else {}
    for sandbox_id, unit in sorted(units.items()):
        if sandbox_id not in known:
            found.append(Leftover("unit", sandbox_id, unit))
    for sandbox_id, pid in machine.nspawn_processes().items():
        if re.fullmatch(_ID, sandbox_id) and sandbox_id not in known and sandbox_id not in units:  # a unit owns it
            found.append(Leftover("process", sandbox_id, f"systemd-nspawn pid {pid}"))
    return found


def fix(leftovers: list[Leftover]) -> None:
    """Remove leftovers in dependency order: units and processes, cgroups, mounts, network, directories."""
    order = ["unit", "process", "cgroup", "mount", "nft-rule", "veth", "netns", "directory"]
    for item in sorted(leftovers, key=lambda leftover: order.index(leftover.kind)):
        if item.kind == "unit":
            systemd_launch.SystemdLauncher().stop(None, None, item.sandbox_id)
        elif item.kind == "process":
            machine.stop(int(item.detail.rsplit(" ", 1)[-1]), None, item.sandbox_id, timeout=10)
        elif item.kind == "cgroup":
            machine.stop(None, None, item.sandbox_id, timeout=10)  # kills what is left in it and removes it
        elif item.kind == "mount":
            subprocess.run(["umount", "--lazy", item.detail], check=False)
        elif item.kind == "nft-rule":  # detail: FAMILY TABLE CHAIN handle N
            subprocess.run(["nft", "delete", "rule", *item.detail.split()], check=False)
        elif item.kind == "veth":
            subprocess.run(["ip", "link", "del", item.detail], check=False)
        elif item.kind == "netns":
            subprocess.run(["ip", "netns", "del", item.detail], check=False)
        elif item.kind == "directory":
            subprocess.run(["rm", "-rf", "--one-file-system", item.detail], check=False)


def _paths_being_deleted() -> set[str]:
    return {
        argument for _, argv in machine.process_command_lines() if argv[0].rsplit("/", 1)[-1] == "rm" for argument in argv[1:]
    }


def _netns_names() -> list[str]:
    directory = Path("/run/netns")
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def _link_names() -> list[str]:
    result = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=False)
    return [link["ifname"] for link in json.loads(result.stdout or "[]")] if result.returncode == 0 else []
