"""Sandbox operations, the functions behind both doors: `km create goose` and `doit create:goose`.

Each takes plain arguments, does one thing through the substrate and the state store, and raises a
typed error the CLI turns into one line. The substrate is chosen by `--substrate`, else
`KM_SUBSTRATE`, else the profile's own `runtime.substrate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

from controller.aws.config import config_path, load_operator_config
from controller.compiler import compile_profile
from controller.converge import Convergence, Observed, plan_convergence
from controller.profile import ProfileResolver, load_profile, parse_duration
from controller.state import SandboxNotFound, SandboxRecord, SQLiteStateStore, StateStore, default_state_path
from controller.substrates.local.reaper import ensure_reaper
from controller.substrates.local.substrate import LocalSubstrate, PlanInput, SubstrateError

Progress = Callable[[str], None]
SUBSTRATE_ENV = "KM_SUBSTRATE"
SUBSTRATES = ("local", "ec2")
PRIVILEGED_WARNING = (
    "WARNING: execution.privileged: true gives the agent root through sudo; it stays inside the egress "
    "policy, but what it changes on the machine's disk runs at the next boot: destroy the sandbox rather "
    "than resume it for other work (README: Root in a privileged profile)"
)


@dataclass(frozen=True)
class ConvergeResult:
    alias: str
    convergence: Convergence
    record: SandboxRecord | None
    dry_run: bool


if TYPE_CHECKING:  # imported when an ec2 sandbox is met: local-only commands never load the AWS code
    from controller.substrates.ec2.substrate import Ec2Substrate

Substrate: TypeAlias = "LocalSubstrate | Ec2Substrate"


def state_store() -> StateStore:
    """The local store (SQLite): local sandboxes, and the first place a reference is looked up."""
    return SQLiteStateStore(default_state_path())


def state_store_for(substrate: str) -> StateStore:
    """Where a substrate's sandboxes are recorded: SQLite for local, the account's DynamoDB table for ec2."""
    if substrate == "ec2":
        from controller.state.dynamodb import DynamoDBStateStore

        config = load_operator_config()
        return DynamoDBStateStore(config.table("sandboxes"), config.effective_region())
    return state_store()


def ec2_configured() -> bool:
    """Whether this operator uses ec2 (a km configuration file, written by `km init`, or KM_SUBSTRATE=ec2):
    only then do lookups and listings also ask DynamoDB, so local-only use never waits on AWS."""
    return os.environ.get(SUBSTRATE_ENV) == "ec2" or config_path().is_file()


def other_store(chosen: str) -> StateStore | None:
    """The store of the substrate not chosen, when it can hold sandboxes. Aliases and list numbers are the
    operator's across both, so `goose` or `#2` always names one sandbox."""
    if chosen == "ec2":
        return state_store()
    return state_store_for("ec2") if ec2_configured() else None


def choose_substrate(requested: str | None, profile_substrate: str) -> str:
    chosen = requested or os.environ.get(SUBSTRATE_ENV) or profile_substrate
    if chosen not in SUBSTRATES:
        raise SubstrateError(f"unknown substrate {chosen!r} (from --substrate or {SUBSTRATE_ENV}); use local or ec2")
    return chosen


def substrate_for(name: str, store: StateStore) -> Substrate:
    if name == "ec2":
        from controller.substrates.ec2.substrate import Ec2Substrate

        return Ec2Substrate(store)
    if os.geteuid() != 0:
        raise SubstrateError("the local substrate needs root (nspawn, network namespaces, mounts); run km as root")
    return LocalSubstrate(store)


def converge(
    reference: str,
    *,
    alias: str | None = None,
    substrate: str | None = None,
    dry_run: bool = False,
    store: StateStore | None = None,
    progress: Progress = lambda _: None,
) -> ConvergeResult:
    """Make the sandbox named by `alias` (default: the profile's name) match the profile's compiled plan."""
    profile, merged = load_profile(reference, ProfileResolver())
    chosen = choose_substrate(substrate, profile.spec.runtime.substrate)
    other = None if store is not None else other_store(chosen)
    store = store or state_store_for(chosen)
    if chosen != profile.spec.runtime.substrate:
        # Compile for where it will really run, so the plan, its hashes and host-agent.json all agree.
        runtime = profile.spec.runtime.model_copy(update={"substrate": chosen})
        profile = profile.model_copy(update={"spec": profile.spec.model_copy(update={"runtime": runtime})})
    compiled = compile_profile(profile)
    plan = compiled.plan
    alias = alias or profile.metadata.name
    local = substrate_for(chosen, store)
    record, owner = store.find_by_alias(alias), local
    if record is None and other is not None and (elsewhere := other.find_by_alias(alias)) is not None:
        record, owner = elsewhere, substrate_for(elsewhere.substrate, other)  # moving substrates: replaced below
    changed = record is not None and (record.runtime_hash, record.policy_hash) != (
        plan["hashes"]["runtime"],
        plan["hashes"]["policy"],
    )
    observed = Observed(
        record,
        owner.observe(record) if record else None,
        owner.applied_plan(record) if record and changed else None,  # only to name what changed
        finishes_interrupted=owner.finishes_interrupted,
    )
    convergence = plan_convergence(plan, observed)
    if dry_run or convergence.action == "none":
        return ConvergeResult(alias, convergence, record, dry_run)
    plan_input = PlanInput(plan, compiled.userdata, compiled.policy_update)
    if execution_privileged(plan):
        progress(PRIVILEGED_WARNING)
    if convergence.action == "finish" and record is not None:
        from controller.substrates.ec2.substrate import Ec2Substrate

        assert isinstance(owner, Ec2Substrate), "only the ec2 substrate finishes interrupted creates"
        progress(convergence.describe(alias))
        return ConvergeResult(alias, convergence, owner.finish_create(record, plan_input, progress), dry_run)
    if convergence.action == "update" and record is not None:
        return ConvergeResult(alias, convergence, owner.apply_policy(record, plan_input), dry_run)
    if convergence.action == "replace" and record is not None:
        if record.locked:
            raise SubstrateError(f"{alias} ({record.sandbox_id}) must be replaced but is locked; `km unlock {alias}` first")
        progress(convergence.describe(alias))
        owner.destroy(record, force=True)
    taken_elsewhere = [each.number for each in other.list() if each.number is not None] if other is not None else []
    created = local.create(plan_input, alias, str(merged.file), progress, taken_elsewhere)
    if chosen == "local":
        ensure_reaper()
    return ConvergeResult(alias, convergence, created, dry_run)


def resume(ref: str, store: StateStore | None = None, progress: Progress = lambda _: None) -> SandboxRecord:
    record, substrate = resolve(ref, store)
    resumed = substrate.resume(record, progress)
    if record.substrate == "local":
        ensure_reaper()
    return resumed


def execution_privileged(plan: dict[str, Any]) -> bool:
    return bool(plan["profile"]["spec"]["execution"].get("privileged"))


def resolve(ref: str, store: StateStore | None = None) -> tuple[SandboxRecord, Substrate]:
    """The sandbox `ref` names (id, alias or number): locally first, then in the account when ec2 is in use."""
    if store is not None:
        record = store.resolve(ref)
        return record, substrate_for(record.substrate, store)
    local = state_store()
    try:
        record = local.resolve(ref)
        return record, substrate_for(record.substrate, local)
    except SandboxNotFound:
        if not ec2_configured():
            raise
    remote = state_store_for("ec2")
    record = remote.resolve(ref)
    return record, substrate_for("ec2", remote)


def list_sandboxes(store: StateStore | None = None) -> list[tuple[SandboxRecord, str]]:
    """Every sandbox with its live status (ec2 ones with their recorded status: no API call per sandbox)."""
    stores = [store] if store is not None else [state_store(), *([state_store_for("ec2")] if ec2_configured() else [])]
    found: list[tuple[SandboxRecord, str]] = []
    for each in stores:
        local = LocalSubstrate(each)
        found += [(record, local.observe(record) if record.substrate == "local" else record.status) for record in each.list()]
    return found


def extend(ref: str, duration: str, store: StateStore | None = None) -> SandboxRecord:
    record, substrate = resolve(ref, store)
    seconds = parse_duration(duration)
    base = max(record.ttl_expiry or datetime.now(UTC), datetime.now(UTC))
    expiry = base + timedelta(seconds=seconds)
    if record.substrate == "ec2":  # local TTLs are the reaper's, which reads the record
        from controller.substrates.ec2.substrate import Ec2Substrate

        assert isinstance(substrate, Ec2Substrate)
        substrate.set_ttl(record, expiry)
    return substrate.store.update(record.sandbox_id, ttl_expiry=expiry)


def set_locked(ref: str, locked: bool, store: StateStore | None = None) -> SandboxRecord:
    record, substrate = resolve(ref, store)
    return substrate.store.update(record.sandbox_id, locked=locked)
