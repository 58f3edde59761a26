"""`km create|list|status|destroy|stop|pause|resume|extend|lock|unlock|shell`: thin wrappers over controller.sandboxes."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import click

from controller.agents import AgentRunError
from controller.cli.output import print_json, report_findings
from controller.converge import SandboxBusy
from controller.images.chroot import BakeError
from controller.profile import ProfileError
from controller.state import SandboxRecord, StateError
from controller.substrates.local.machine import MachineError
from controller.substrates.local.network import NetworkError
from controller.substrates.local.substrate import SubstrateError, host_agent_active

P = ParamSpec("P")
R = TypeVar("R")
OPERATOR_ERRORS = (AgentRunError, SubstrateError, MachineError, NetworkError, StateError, BakeError, SandboxBusy)


def operator_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Expected failures become one clear line on stderr and exit 1; tracebacks are for bugs.

    SIGTERM becomes SystemExit, so an interrupted create still removes what it made.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            return function(*args, **kwargs)
        except ProfileError as error:
            report_findings(error.findings)
        except OPERATOR_ERRORS as error:
            click.echo(f"km: {error}", file=sys.stderr)
        sys.exit(1)

    return wrapper


def _progress(message: str) -> None:
    click.echo(message, file=sys.stderr)


def _short_duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _remaining(until: datetime | None) -> str:
    if until is None:
        return "-"
    seconds = int((until - datetime.now(UTC)).total_seconds())
    return _short_duration(seconds) if seconds > 0 else "expired"


def _record_json(record: SandboxRecord, status: str) -> dict[str, Any]:
    return {**record.as_json(), "status": status}


@click.command("create")
@click.argument("profile", metavar="NAME_OR_FILE")
@click.option("--alias", help="Name the sandbox (default: the profile's name).")
@click.option("--substrate", type=click.Choice(["local", "ec2"]), help="Where to run it (default: KM_SUBSTRATE or the profile).")
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@operator_errors
def create_command(profile: str, alias: str | None, substrate: str | None, dry_run: bool, as_json: bool) -> None:
    """Create the sandbox, or converge an existing one to the profile (the same work as doit create:NAME)."""
    from controller.sandboxes import converge

    result = converge(profile, alias=alias, substrate=substrate, dry_run=dry_run, progress=_progress)
    prefix = "would " if dry_run and result.convergence.action != "none" else ""
    if as_json:
        record = result.record
        print_json({"action": result.convergence.action, "dry_run": dry_run, "sandbox": record.as_json() if record else None})
        return
    click.echo(prefix + result.convergence.describe(result.alias))
    if result.record is not None and not dry_run:
        record = result.record
        click.echo(
            f"{record.alias}: {record.sandbox_id} {record.status} ({record.substrate}, {record.resources.get('address', '-')})"
        )


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--wide", is_flag=True, help="Add profile, substrate, region and idle timeout.")
@operator_errors
def list_command(as_json: bool, wide: bool) -> None:
    """List sandboxes with their live status."""
    from controller.sandboxes import list_sandboxes

    rows = list_sandboxes()
    if as_json:
        print_json([_record_json(record, status) for record, status in rows])
        return
    header = ["#", "ALIAS", "SANDBOX ID", "STATUS", "TTL", "UP"] + (["PROFILE", "SUBSTRATE", "REGION", "IDLE"] if wide else [])
    table = [header]
    for record, status in rows:
        up = _short_duration(int((datetime.now(UTC) - record.created_at).total_seconds()))
        row = [str(record.number), record.alias, record.sandbox_id, status + (" (locked)" if record.locked else ""),
               _remaining(record.ttl_expiry), up]  # fmt: skip
        if wide:
            idle = f"{record.idle_timeout_seconds // 60}m" if record.idle_timeout_seconds else "-"
            row += [record.profile, record.substrate, record.region, idle]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command("status")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def status_command(ref: str, as_json: bool) -> None:
    """One sandbox: its record, live status and the host agent's health."""
    from controller.sandboxes import resolve

    record, substrate = resolve(ref)
    status = substrate.observe(record)
    leader = record.resources.get("leader_pid")
    health = _host_agent_health(substrate, record) if status == "running" and leader else {}
    # A daemon that answers is active; only when it does not is systemd asked why (one round trip, usually).
    answered = bool(health) and "health_error" not in health
    agent = "active" if answered or (leader and status == "running" and host_agent_active(int(leader))) else "inactive"
    if as_json:
        print_json({**_record_json(record, status), "host_agent": {"status": agent, **health}})
        return
    click.echo(f"{record.alias} ({record.sandbox_id}): {status}; host agent {agent}")
    if health:
        outbox = health.get("outbox") or {}
        click.echo(f"  agent runs active: {len(health.get('active_runs', []))}; uploads pending: {outbox.get('pending', '-')}")
        if gate := health.get("gate"):
            decisions = gate.get("decisions", {})
            click.echo(
                f"  egress gate: {gate['mode']} ({gate['enforcement']}), {gate['allow_entries']} allowed addresses, "
                f"{decisions.get('denied', 0)} denied, {decisions.get('would_deny', 0)} would be denied"
            )
    click.echo(f"  profile {record.profile} on {record.substrate} ({record.region}); TTL {_remaining(record.ttl_expiry)}")
    if record.locked:
        click.echo("  locked: destroy, stop and automatic teardown are refused")


def _host_agent_health(substrate: Any, record: SandboxRecord) -> dict[str, Any]:
    """The daemon's own view (active runs, outbox); an error in it is reported, not raised."""
    completed = substrate.host_agent_command(record, ["health"], timeout=10)
    if completed.returncode != 0:
        return {"health_error": completed.stderr.strip() or f"exit code {completed.returncode}"}
    return dict(json.loads(completed.stdout))


@click.command("destroy")
@click.argument("ref")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@operator_errors
def destroy_command(ref: str, yes: bool) -> None:
    """Remove a sandbox and everything it had: machine, network, disk, volumes, record."""
    from controller.sandboxes import resolve

    record, substrate = resolve(ref)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Destroy {record.alias} ({record.sandbox_id}) and its disk?", abort=True)
    substrate.destroy(record)
    click.echo(f"{record.alias}: destroyed ({record.sandbox_id})")


def _lifecycle(name: str, help_text: str, action: Callable[[Any, SandboxRecord], SandboxRecord]) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("ref")
    @operator_errors
    def command(ref: str) -> None:
        from controller.sandboxes import resolve

        record, substrate = resolve(ref)
        updated = action(substrate, record)
        click.echo(f"{updated.alias}: {updated.status} ({updated.sandbox_id})")

    return command


stop_command = _lifecycle("stop", "Power a sandbox off; its disk is kept.", lambda s, r: s.stop(r))
pause_command = _lifecycle("pause", "Freeze a sandbox in memory (the local hibernation).", lambda s, r: s.pause(r))


@click.command("resume")
@click.argument("ref")
@operator_errors
def resume_command(ref: str) -> None:
    """Start a stopped sandbox or thaw a paused one."""
    from controller.sandboxes import resume

    record = resume(ref, progress=_progress)
    click.echo(f"{record.alias}: {record.status} ({record.sandbox_id})")


@click.command("extend")
@click.argument("ref")
@click.argument("duration")
@operator_errors
def extend_command(ref: str, duration: str) -> None:
    """Move a sandbox's TTL deadline DURATION (e.g. 2h, 1d) further out."""
    from controller.sandboxes import extend

    record = extend(ref, duration)
    click.echo(f"{record.alias}: TTL now ends {record.ttl_expiry:%Y-%m-%d %H:%M:%SZ} ({_remaining(record.ttl_expiry)} left)")


def _locking(name: str, locked: bool) -> click.Command:
    @click.command(name, help="Refuse destroy, stop and automatic teardown." if locked else "Allow them again.")
    @click.argument("ref")
    @operator_errors
    def command(ref: str) -> None:
        from controller.sandboxes import set_locked

        record = set_locked(ref, locked)
        click.echo(f"{record.alias}: {'locked' if record.locked else 'unlocked'}")

    return command


lock_command = _locking("lock", True)
unlock_command = _locking("unlock", False)


@click.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("ref")
@click.option("--root", is_flag=True, help="As root, outside the agent's cgroup (the policy does not apply).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@operator_errors
def shell_command(ref: str, root: bool, command: tuple[str, ...]) -> None:
    """A login shell in the sandbox as the `sandbox` user, or run COMMAND (after --) and exit with its status."""
    from controller.sandboxes import resolve

    record, substrate = resolve(ref)
    working_dir = (substrate.applied_plan(record) or {}).get("hostAgent", {}).get("execution", {}).get("working_dir", "/")
    tty = not command and sys.stdin.isatty()
    sys.exit(substrate.shell(record, list(command) or None, root=root, working_dir=working_dir, tty=tty))


@click.command("doctor")
@click.option("--local", "local", is_flag=True, help="Check this host's local substrate.")
@click.option("--ec2", "ec2", is_flag=True, help="Check the AWS account (this installation's resource prefix).")
@click.option("--fix", is_flag=True, help="Remove what is found.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@operator_errors
def doctor_command(local: bool, ec2: bool, fix: bool, as_json: bool) -> None:
    """Find what sandboxes left behind with no record (local: namespaces, links, NAT rules, cgroups, mounts,
    disks; ec2: instances, volumes, security groups, roles, instance profiles, schedules); exit 1 if any."""
    if not (local or ec2):
        raise click.UsageError("say what to check: --local (this host), --ec2 (the AWS account), or both")
    found: list[Any] = []
    remaining: list[Any] = []
    if local:
        more, left = _local_doctor(fix)
        found, remaining = found + more, remaining + left
    if ec2:
        more, left = _ec2_doctor(fix)
        found, remaining = found + more, remaining + left
    if as_json:
        print_json({"found": [item.as_json() for item in found], "remaining": [item.as_json() for item in remaining]})
    else:
        for item in found:
            click.echo(
                f"{item.kind:9} {item.sandbox_id}  {item.detail}" + ("  (removed)" if fix and item not in remaining else "")
            )
        click.echo(f"{len(found)} leftover(s) found" + (f", {len(found) - len(remaining)} removed" if fix else ""))
    sys.exit(1 if remaining else 0)


def _local_doctor(fix: bool) -> tuple[list[Any], list[Any]]:
    from controller.sandboxes import state_store
    from controller.substrates.local import doctor
    from controller.substrates.local.substrate import sandbox_root

    store = state_store()
    found = doctor.find_leftovers(store, sandbox_root())
    if not (fix and found):
        return list(found), list(found)
    doctor.fix(found)
    return list(found), list(doctor.find_leftovers(store, sandbox_root()))


def _ec2_doctor(fix: bool) -> tuple[list[Any], list[Any]]:
    from controller.aws.config import load_operator_config
    from controller.sandboxes import state_store_for
    from controller.substrates.ec2 import doctor

    config = load_operator_config()
    region, prefix = config.effective_region(), config.resource_prefix
    known = [record.sandbox_id for record in state_store_for("ec2").list()]
    found = doctor.find_orphans(region, prefix, known)
    if not (fix and found):
        return list(found), list(found)
    doctor.fix(region, prefix, found)
    return list(found), list(doctor.find_orphans(region, prefix, known))


SANDBOX_COMMANDS = [
    create_command,
    list_command,
    status_command,
    destroy_command,
    stop_command,
    pause_command,
    resume_command,
    extend_command,
    lock_command,
    unlock_command,
    shell_command,
    doctor_command,
]
