"""The local substrate: sandboxes as nspawn machines on this host, recorded in the local state store.

Create claims the alias in the state store first (so two operators cannot both create it), then
builds network, disk and machine; any failure tears down everything it made and says why. The
compiled `userdata.sh` runs at first boot exactly as on EC2, and its outcome is read back from the
machine's `/var/lib/km/boot-status`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.images.bake import bake
from controller.images.recipe import recipe_names
from controller.images.store import Image, ImageStore
from controller.state import SandboxRecord, StateStore
from controller.substrates.local import machine
from controller.substrates.local.addressing import POOL, POOL6, choose_slot, observe_networks_in_use
from controller.substrates.local.launcher import host_launcher
from controller.substrates.local.machine import MachineError, MachineSpec
from controller.substrates.local.network import SandboxNetwork, allocation_lock, sandbox_upstream
from controller.substrates.records import creator_alive, policy_changes, starting_record
from host_agent.containment import HOST_AGENT_COMMAND
from host_agent.paths import TMUX_SOCKET

Progress = Callable[[str], None]
SANDBOX_DIR_ENV = "KM_SANDBOX_DIR"
DEFAULT_SANDBOX_DIR = Path("/var/lib/km/sandboxes")
ARTIFACTS_DIR_ENV = "KM_ARTIFACTS_DIR"  # default: `artifacts` beside the sandboxes directory
# Inside the machine: the outbox's file target (the local analog of the artifacts bucket).
SANDBOX_ARTIFACTS_DIR = "/var/lib/km/artifacts"
# IP[:PORT] a local sandbox's resolver forwards allowed queries to (default: the host's resolver).
DNS_UPSTREAM_ENV = "KM_LOCAL_DNS_UPSTREAM"
# The operator's OTLP collector (endpoint, headers), passed to each sandbox created; default: none, and
# telemetry goes to the artifacts store.
OTLP_ENV = ("KM_OTLP_ENDPOINT", "KM_OTLP_HEADERS")
BOOT_TIMEOUT_SECONDS = 120
INIT_COMMANDS_TIMEOUT_SECONDS = 1800


class SubstrateError(Exception):
    """A sandbox operation failed; the message names the sandbox, the cause and the fix."""


@dataclass(frozen=True)
class PlanInput:
    """What create needs from a compiled plan (build/<name>/)."""

    plan: dict[str, Any]
    userdata: str
    policy_update: str = ""  # the compiled live-policy script (render_policy_update)


def sandbox_root() -> Path:
    return Path(os.environ.get(SANDBOX_DIR_ENV) or DEFAULT_SANDBOX_DIR)


class LocalSubstrate:
    finishes_interrupted = False  # a killed create is replaced: a machine is cheap to make again

    def __init__(self, store: StateStore, images: ImageStore | None = None, root: Path | None = None) -> None:
        self.store = store
        self.images = images or ImageStore()
        self.root = root or sandbox_root()
        self.artifacts = Path(os.environ.get(ARTIFACTS_DIR_ENV) or self.root.parent / "artifacts")

    # ---- create -------------------------------------------------------------------------------
    def create(
        self,
        compiled: PlanInput,
        alias: str,
        profile_file: str | None = None,
        progress: Progress = lambda _: None,
        avoid_numbers: Collection[int] = (),
    ) -> SandboxRecord:
        _require_root()
        machine.require_cgroup2()
        plan = compiled.plan
        image = self._image_for(plan["sandbox"]["ami"], progress)
        record = self.store.insert(
            starting_record(plan, alias, profile_file, "local", {"image": image.name, "volumes": _volume_list(plan)}),
            avoid_numbers,
        )
        sandbox_id = record.sandbox_id
        progress(f"{sandbox_id}: created record for alias {alias}")
        try:
            record = self._claim_network(record)
            return self._build(record, compiled, image.rootfs, progress)
        except BaseException as error:
            progress(f"{sandbox_id}: create failed, removing what was made")
            self._teardown(self.store.get(sandbox_id), keep_log=True)
            self.store.delete(sandbox_id)
            if isinstance(error, (SubstrateError, MachineError)):
                raise SubstrateError(f"create {alias} ({sandbox_id}) failed: {error}") from None
            raise

    def _build(self, record: SandboxRecord, compiled: PlanInput, image_rootfs: Path, progress: Progress) -> SandboxRecord:
        plan = compiled.plan
        spec = self.machine_spec(record, image_rootfs)
        spec.directory.mkdir(parents=True, exist_ok=True)
        machine.mount_rootfs(spec)
        self._prepare_volumes(record)
        self._write_first_boot_files(spec, record, compiled)
        has_init = bool(plan["profile"]["spec"]["execution"].get("initCommands"))
        timeout = INIT_COMMANDS_TIMEOUT_SECONDS if has_init else BOOT_TIMEOUT_SECONDS
        progress(f"{record.sandbox_id}: booting" + (" (first boot runs the profile's initCommands)" if has_init else ""))
        nspawn_pid, leader_pid = host_launcher().boot(spec, timeout, progress)
        record = self.store.update(
            record.sandbox_id,
            resources={**record.resources, "nspawn_pid": str(nspawn_pid), "leader_pid": str(leader_pid),
                       "address": spec.network.sandbox_address, "directory": str(spec.directory)},
        )  # fmt: skip
        self._check_first_boot(spec)
        self._save_applied_plan(spec, plan)
        return self.store.update(record.sandbox_id, status="running")

    def applied_plan(self, record: SandboxRecord) -> dict[str, Any] | None:
        """The plan this sandbox was last converged to (to say which fields a new plan changes)."""
        path = self.root / record.sandbox_id / "applied-plan.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _save_applied_plan(self, spec: MachineSpec, plan: dict[str, Any]) -> None:
        (spec.directory / "applied-plan.json").write_text(json.dumps(plan, indent=2) + "\n")

    def apply_policy(self, record: SandboxRecord, compiled: PlanInput) -> SandboxRecord:
        """Live policy change: rewrite host-agent.json, the environment and config files, reload the daemon."""
        _require_root()
        plan = compiled.plan
        spec = self.machine_spec(record)
        if self.observe(record) != "running":
            raise SubstrateError(
                f"{record.alias} ({record.sandbox_id}) is {self.observe(record)}; resume it before changing its policy"
            )
        result = machine.run_inside(
            _int_required(record, "leader_pid"),
            ["/bin/bash", "-s"],
            user=None,
            in_agent_slice=False,
            input_text=compiled.policy_update,
            timeout=120,
        )
        if result.returncode != 0:
            raise SubstrateError(
                f"{record.alias}: the policy update failed inside the sandbox: {result.stderr.strip() or result.stdout.strip()}"
            )
        self._save_applied_plan(spec, plan)
        return self.store.update(record.sandbox_id, **policy_changes(record, plan))

    def machine_spec(self, record: SandboxRecord, image_rootfs: Path | None = None) -> MachineSpec:
        directory = self.root / record.sandbox_id
        if image_rootfs is None:
            image = self.images.find(record.resources["image"])
            if image is None:
                raise SubstrateError(
                    f"{record.sandbox_id}: its image {record.resources['image']} is gone from {self.images.root}"
                )
            image_rootfs = image.rootfs
        return MachineSpec(
            sandbox_id=record.sandbox_id,
            hostname=record.alias,
            image_rootfs=image_rootfs,
            directory=directory,
            network=self._network(record),
            binds=tuple(self._binds(record)),
        )

    def _volumes(self, record: SandboxRecord) -> list[LocalVolume]:
        """The additional volume is an ext4 image of its size, loop-mounted; EFS is one directory all share."""
        volumes = []
        for entry in filter(None, record.resources.get("volumes", "").split(",")):
            kind, mount_point, *size = entry.split(":")
            if kind == "ebs":
                name = mount_point.strip("/").replace("/", "_")
                base = self.root / record.sandbox_id / "volumes"
                volumes.append(LocalVolume(kind, mount_point, base / name, base / f"{name}.ext4", int(size[0]) if size else 1))
            else:
                volumes.append(LocalVolume(kind, mount_point, self.root.parent / "efs" / "default", None, None))
        return volumes

    def _binds(self, record: SandboxRecord) -> list[tuple[Path, str]]:
        """Volumes, and the sandbox's own corner of the artifacts store (it sees no other sandbox's)."""
        binds = [(volume.host_dir, volume.mount_point) for volume in self._volumes(record)]
        binds.append((self.agent_runs_dir(record), f"{SANDBOX_ARTIFACTS_DIR}/agent-runs/{record.sandbox_id}"))
        binds.append((self.telemetry_dir(record), f"{SANDBOX_ARTIFACTS_DIR}/telemetry/{record.sandbox_id}"))
        return binds

    def _prepare_volumes(self, record: SandboxRecord) -> None:
        self.agent_runs_dir(record).mkdir(parents=True, exist_ok=True)
        self.telemetry_dir(record).mkdir(parents=True, exist_ok=True)
        for volume in self._volumes(record):
            volume.host_dir.mkdir(parents=True, exist_ok=True)
            if volume.image_file is None or machine.is_mountpoint(volume.host_dir):
                continue
            if not volume.image_file.exists():
                with volume.image_file.open("wb") as image:
                    image.truncate((volume.size_gib or 1) * 1024**3)  # sparse: disk is used as data is written
                mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
                _checked([*mkfs, str(volume.image_file)], f"formatting the {volume.mount_point} volume")
            _checked(
                ["mount", "-o", "loop", str(volume.image_file), str(volume.host_dir)], f"mounting the {volume.mount_point} volume"
            )

    def _release_volumes(self, record: SandboxRecord) -> None:
        for volume in self._volumes(record):
            if volume.image_file is not None and machine.is_mountpoint(volume.host_dir):
                _checked(["umount", str(volume.host_dir)], f"unmounting the {volume.mount_point} volume")

    def _write_first_boot_files(self, spec: MachineSpec, record: SandboxRecord, compiled: PlanInput) -> None:
        etc_km = spec.rootfs / "etc/km"
        etc_km.mkdir(parents=True, exist_ok=True)
        (etc_km / "userdata.sh").write_text(compiled.userdata)
        (etc_km / "userdata.sh").chmod(0o700)
        identity = {
            "KM_SANDBOX_ID": record.sandbox_id,
            "KM_ALIAS": record.alias,
            "KM_REGION": record.region,
            "KM_RESOURCE_PREFIX": "km",
            "KM_EFS_ID": "local",
            "KM_ARTIFACTS_URI": f"file://{SANDBOX_ARTIFACTS_DIR}",
        }
        # Always named, not left to the copy of the host's resolv.conf: an image whose resolv.conf is
        # resolved's stub link keeps the link under nspawn's copy-host and would have no upstream.
        if upstream := sandbox_upstream(os.environ.get(DNS_UPSTREAM_ENV)):
            identity["KM_DNS_UPSTREAM"] = (
                f"[{upstream[0]}]:{upstream[1]}" if ":" in upstream[0] else f"{upstream[0]}:{upstream[1]}"
            )
        (etc_km / "sandbox.env").write_text("".join(f"{key}={value}\n" for key, value in identity.items()))
        collector = {name: os.environ[name] for name in OTLP_ENV if os.environ.get(name)}
        if collector:  # root only: the headers usually carry the collector's API key
            telemetry_env = etc_km / "telemetry.env"
            telemetry_env.touch(mode=0o600)
            telemetry_env.chmod(0o600)
            telemetry_env.write_text("".join(f"{key}={value}\n" for key, value in collector.items()))
        (spec.rootfs / "etc/hostname").write_text(f"{spec.hostname}\n")
        hosts = spec.rootfs / "etc/hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {spec.hostname}\n::1 localhost ip6-localhost ip6-loopback\n")

    def _check_first_boot(self, spec: MachineSpec) -> None:
        status_file = spec.rootfs / "var/lib/km/boot-status"
        status = status_file.read_text().strip() if status_file.exists() else "missing"
        if status != "ready":
            log = spec.rootfs / "var/log/km-userdata.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else "(no userdata log)"
            raise SubstrateError(f"first boot did not complete ({status}); the end of its log:\n{tail}")

    def _image_for(self, ami: str, progress: Progress) -> Image:
        if ami not in recipe_names():
            raise SubstrateError(
                f"no local image for runtime.ami {ami!r}: local images are {', '.join(recipe_names())}; "
                "set runtime.ami to one of them or add a recipe in amis/"
            )
        found = bake(ami, self.images, progress=lambda message: progress(f"{message} (first time only)"))[0]
        return found

    def _claim_network(self, record: SandboxRecord) -> SandboxRecord:
        """Pick the sandbox's network slot and put its addresses on the host, under the host-wide lock.

        The list number is the preferred slot (unique among this store's sandboxes); any slot whose /30
        or /64 is already addressed or routed on the host is skipped, whichever km (or anything else)
        put it there, and so are slots this store's other sandboxes hold while their network is down.
        """
        with allocation_lock():
            reserved = {
                int(other.resources["slot"])
                for other in self.store.list()
                if other.substrate == "local" and other.sandbox_id != record.sandbox_id and "slot" in other.resources
            }
            preferred = _int(record.resources.get("slot")) or record.number
            slot = choose_slot(preferred, observe_networks_in_use(), reserved)
            if slot is None:
                raise SubstrateError(
                    f"no free network slot for {record.sandbox_id}: every block of {POOL} (and {POOL6}) is in use on "
                    "this host; destroy sandboxes or run `km doctor --local --fix`"
                )
            if record.resources.get("slot") != str(slot):
                record = self.store.update(record.sandbox_id, resources={**record.resources, "slot": str(slot)})
            self._network(record).create()
        return record

    def _network(self, record: SandboxRecord) -> SandboxNetwork:
        return SandboxNetwork(record.sandbox_id, int(record.resources["slot"]), os.environ.get(DNS_UPSTREAM_ENV))

    # ---- lifecycle ----------------------------------------------------------------------------
    def destroy(self, record: SandboxRecord, force: bool = False) -> None:
        """Remove everything: machine, network, NAT rule, disk, volumes, state row. Locked sandboxes refuse."""
        _require_root()
        if record.locked and not force:
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is locked; `km unlock {record.alias}` first")
        self._teardown(record, keep_log=False)
        self.store.delete(record.sandbox_id)

    def stop(self, record: SandboxRecord) -> SandboxRecord:
        """Power the machine off and keep its disk (the EC2 stop analog)."""
        _require_root()
        if record.locked:
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is locked; `km unlock {record.alias}` first")
        resources = record.resources
        host_launcher().stop(_int(resources.get("nspawn_pid")), _int(resources.get("leader_pid")), record.sandbox_id)
        machine.unmount_rootfs(self.machine_spec(record))
        self._release_volumes(record)
        return self.store.update(record.sandbox_id, status="stopped")

    def pause(self, record: SandboxRecord) -> SandboxRecord:
        """Freeze the machine's cgroup: memory kept, nothing runs (the local analog of hibernation)."""
        _require_root()
        if self.observe(record) != "running":
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is {self.observe(record)}, not running")
        host_launcher().freeze(record.sandbox_id)
        return self.store.update(record.sandbox_id, status="paused")

    def resume(self, record: SandboxRecord, progress: Progress = lambda _: None) -> SandboxRecord:
        _require_root()
        status = self.observe(record)
        if status == "running":
            return self.store.update(record.sandbox_id, status="running")
        if status == "paused":
            host_launcher().thaw(record.sandbox_id)
            return self.store.update(record.sandbox_id, status="running")
        if not self._network(record).exists():
            record = self._claim_network(record)  # its old block may have been taken since (a host reboot)
        spec = self.machine_spec(record)
        machine.mount_rootfs(spec)
        self._prepare_volumes(record)
        nspawn_pid, leader_pid = host_launcher().boot(spec, BOOT_TIMEOUT_SECONDS, progress)
        resources = {**record.resources, "nspawn_pid": str(nspawn_pid), "leader_pid": str(leader_pid)}
        return self.store.update(record.sandbox_id, status="running", resources=resources)

    def _teardown(self, record: SandboxRecord, keep_log: bool) -> None:
        resources = record.resources
        spec = self.machine_spec(record, Path("/nonexistent")) if "slot" in resources else None
        host_launcher().stop(_int(resources.get("nspawn_pid")), _int(resources.get("leader_pid")), record.sandbox_id)
        if spec is None:
            return
        machine.unmount_rootfs(spec)
        self._release_volumes(record)
        spec.network.destroy()
        if keep_log and spec.console_log.exists():
            shutil.copyfile(spec.console_log, self.root / f".failed-{record.sandbox_id}.log")
        _remove_in_background(spec.directory)

    def observe(self, record: SandboxRecord) -> str:
        """The live status: what the state store says, corrected by what the host shows.

        `creating` means another km process is creating it right now; a `starting` record whose
        creator is gone is a create that was killed, and convergence replaces it.
        """
        if record.status == "starting" and creator_alive(record):
            return "creating"
        launcher = host_launcher()
        running = launcher.is_running(_int(record.resources.get("nspawn_pid")), record.sandbox_id)
        if record.status in ("running", "paused") and not running:
            return "stopped"
        if running and launcher.is_frozen(record.sandbox_id):
            return "paused"
        return record.status

    def shell(self, record: SandboxRecord, command: list[str] | None, root: bool, working_dir: str, tty: bool) -> int:
        leader = _int(record.resources.get("leader_pid"))
        if leader is None or self.observe(record) != "running":
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is not running; start it with `km resume {record.alias}`")
        argv = machine.login_shell_command(command)
        result = machine.run_inside(
            leader,
            argv,
            user=None if root else "sandbox",
            working_dir=working_dir,
            in_agent_slice=not root,
            tty=tty,
            capture=False,
        )
        return result.returncode

    # ---- agent runs ---------------------------------------------------------------------------
    def host_agent_command(
        self, record: SandboxRecord, args: list[str], input_text: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`km-host-agent ARGS` as root inside the machine: the sandbox's control interface."""
        leader = _int(record.resources.get("leader_pid"))
        if leader is None or self.observe(record) != "running":
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is not running; start it with `km resume {record.alias}`")
        return machine.run_inside(
            leader, [HOST_AGENT_COMMAND, *args], user=None, in_agent_slice=False, input_text=input_text, timeout=timeout
        )

    def attach_run_session(self, record: SandboxRecord, session: str) -> int:
        """The operator's terminal on a run's tmux session, as the sandbox user (who owns km's tmux server)."""
        leader = _int_required(record, "leader_pid")
        argv = ["tmux", "-S", str(TMUX_SOCKET), "attach-session", "-t", f"={session}"]
        result = machine.run_inside(leader, argv, user="sandbox", in_agent_slice=True, tty=True, capture=False)
        return result.returncode

    def agent_runs_dir(self, record: SandboxRecord) -> Path:
        """Where this sandbox's outbox uploads its runs on the host: `<artifacts>/agent-runs/<sandbox>/`."""
        return self.artifacts / "agent-runs" / record.sandbox_id

    def telemetry_dir(self, record: SandboxRecord) -> Path:
        """Where its host agent uploads telemetry on the host: `<artifacts>/telemetry/<sandbox>/<signal>/`."""
        return self.artifacts / "telemetry" / record.sandbox_id


def _remove_in_background(directory: Path) -> None:
    """Move the disk aside at once and delete it in a detached process: a disk full of packages takes
    seconds to delete, and nothing needs to wait for that."""
    if not directory.exists():
        return
    trash = directory.with_name(f".trash-{directory.name}-{os.getpid()}")
    os.rename(directory, trash)
    subprocess.Popen(["rm", "-rf", "--one-file-system", str(trash)], start_new_session=True, stdin=subprocess.DEVNULL)


def _int_required(record: SandboxRecord, key: str) -> int:
    value = _int(record.resources.get(key))
    if value is None:
        raise SubstrateError(f"{record.alias} ({record.sandbox_id}) has no {key}; is it running?")
    return value


def _volume_list(plan: dict[str, Any]) -> str:
    """`kind:mountPoint[:sizeGiB]` for each volume the substrate provides (the root disk is the overlay)."""
    return ",".join(
        f"{v['kind']}:{v['mountPoint']}" + (f":{v['sizeGiB']}" if v["kind"] == "ebs" else "")
        for v in plan["volumes"]
        if v["kind"] in ("ebs", "efs")
    )


@dataclass(frozen=True)
class LocalVolume:
    kind: str
    mount_point: str
    host_dir: Path
    image_file: Path | None
    size_gib: int | None


def _checked(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SubstrateError(f"{what} failed: {result.stderr.strip() or result.stdout.strip()}")


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SubstrateError("the local substrate needs root (nspawn, network namespaces, mounts); run km as root")


def host_agent_active(leader_pid: int) -> bool:
    result = subprocess.run(
        ["nsenter", "-t", str(leader_pid), "-a", "systemctl", "is-active", "km-host-agent.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "active"
