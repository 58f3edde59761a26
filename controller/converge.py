"""Convergence: what to do to make a sandbox match its compiled plan, decided without touching anything.

`plan_convergence(desired, observed)` is pure: the substrate observes (state record, is the machine
there) and executes the answer. That makes `--dry-run` free and every case a table row in a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from controller.state import SandboxRecord

Action = Literal["create", "update", "replace", "finish", "none"]


class SandboxBusy(Exception):
    """Another operation on the same sandbox is in progress."""


@dataclass(frozen=True)
class Observed:
    """What the substrate sees of the sandbox an alias names."""

    record: SandboxRecord | None
    status: str | None = None  # the live status, which may differ from the record's
    applied_plan: dict[str, Any] | None = None  # the plan the sandbox was last converged to
    # Whether the substrate can finish a create that was killed, under the same sandbox id (its resource
    # steps are found by tag before they are made); otherwise such a sandbox is replaced.
    finishes_interrupted: bool = False


@dataclass(frozen=True)
class Convergence:
    action: Action
    reasons: list[str] = field(default_factory=list)
    changed_fields: list[str] = field(default_factory=list)

    def describe(self, alias: str) -> str:
        if self.action == "none":
            return f"{alias}: up to date"
        detail = "; ".join(self.reasons)
        fields = f" ({', '.join(self.changed_fields)})" if self.changed_fields else ""
        verb = {"create": "create", "update": "update in place", "replace": "replace", "finish": "finish"}[self.action]
        return f"{alias}: {verb}{fields}: {detail}"


def plan_convergence(desired: dict[str, Any], observed: Observed) -> Convergence:
    record = observed.record
    if record is None:
        return Convergence("create", ["no sandbox has this alias"])
    if observed.status == "creating":
        raise SandboxBusy(f"another km process is creating {record.alias} ({record.sandbox_id}) right now; wait for it to finish")
    if record.substrate != desired["sandbox"]["substrate"]:
        reason = f"it runs on {record.substrate}, the plan says {desired['sandbox']['substrate']}"
        return Convergence("replace", [reason])
    interrupted = observed.status == "starting" or (observed.status is None and record.status == "starting")
    if interrupted and observed.finishes_interrupted and record.plan_hash == desired["hash"]:
        return Convergence("finish", ["an earlier create of the same plan was interrupted; finishing it"])
    broken = ("failed", "nocap", "starting")
    if observed.status in broken or (observed.status is None and record.status in broken):
        return Convergence("replace", [f"the existing sandbox is {observed.status or record.status}"])
    changed = changed_fields(observed.applied_plan["profile"], desired["profile"]) if observed.applied_plan else []
    if record.runtime_hash != desired["hashes"]["runtime"]:
        return Convergence("replace", ["the runtime shape changed (image, instance type, volumes or first-boot setup)"], changed)
    if record.policy_hash != desired["hashes"]["policy"]:
        return Convergence("update", ["policy changed; applied live without a reboot"], changed)
    return Convergence("none")


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two profiles (maps recursed, lists compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new)):
            paths += changed_fields(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return paths
    return [] if old == new else [prefix]
