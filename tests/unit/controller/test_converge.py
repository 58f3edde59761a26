"""Convergence is a pure function from (desired plan, observed sandbox) to one action: a table of cases.

Desired plans are compiled from real profiles, so the hashes compared are the compiler's own; records
are built to match one plan and observed against another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.compiler import compile_profile
from controller.converge import Convergence, Observed, SandboxBusy, changed_fields, plan_convergence
from controller.profile import BUILTIN_PROFILES_DIR, load_profile
from controller.state import SandboxRecord
from tests.helpers import goose_variant

CREATED = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
RUNTIME_REASON = "the runtime shape changed (image, instance type, volumes or first-boot setup)"
POLICY_REASON = "policy changed; applied live without a reboot"

Edit = Callable[[dict[str, Any]], None]


def _add_dns_suffix(spec: dict[str, Any]) -> None:
    spec["network"]["egress"]["allowedDNSSuffixes"].append(".example.com")


def _bigger_and_wider(spec: dict[str, Any]) -> None:
    spec["runtime"]["instanceType"] = "t3.large"
    _add_dns_suffix(spec)


# Goose variants by name; each differs from the reference in one known way.
VARIANTS: dict[str, Edit | None] = {
    "goose": None,
    "local": lambda spec: spec["runtime"].update(substrate="local"),
    "bigger": lambda spec: spec["runtime"].update(instanceType="t3.large"),
    "setup": lambda spec: spec["execution"]["initCommands"].append("pip install ruff"),
    "wider": _add_dns_suffix,
    "env": lambda spec: spec["execution"]["env"].update(GOOSE_MODE="auto"),
    "settings": lambda spec: spec["execution"]["configFiles"].update({"/home/sandbox/.gitconfig": "[user]\n"}),
    "bigger-and-wider": _bigger_and_wider,
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("profiles")
    return {name: compile_profile(goose_variant(directory, edit)).plan for name, edit in VARIANTS.items()}


def record_for(plan: dict[str, Any], **overrides: Any) -> SandboxRecord:
    """A record of a sandbox converged to `plan` (hashes and substrate from it); overrides win."""
    fields: dict[str, Any] = {
        "sandbox_id": "gebpfgk-0123abcd",
        "alias": "goose",
        "profile": "goose",
        "profile_file": None,
        "substrate": plan["sandbox"]["substrate"],
        "region": plan["sandbox"]["region"],
        "status": "running",
        "plan_hash": plan["hash"],
        "runtime_hash": plan["hashes"]["runtime"],
        "policy_hash": plan["hashes"]["policy"],
        "created_at": CREATED,
        "updated_at": CREATED,
        "ttl_expiry": None,
        "idle_timeout_seconds": 3600,
        "teardown_policy": "stop",
    }
    return SandboxRecord(**(fields | overrides))


def test_the_variants_differ_in_the_hash_each_is_meant_to(plans: dict[str, dict[str, Any]]) -> None:
    """Guards the table below: a variant that changed the wrong hash would test the wrong branch."""
    reference = plans["goose"]["hashes"]

    def differs(name: str) -> tuple[bool, bool]:
        hashes = plans[name]["hashes"]
        return hashes["runtime"] != reference["runtime"], hashes["policy"] != reference["policy"]

    assert differs("bigger") == differs("setup") == (True, False)
    assert differs("wider") == differs("env") == differs("settings") == (False, True)
    assert differs("bigger-and-wider") == differs("local") == (True, True)


@dataclass(frozen=True)
class Case:
    """The sandbox was converged to `applied` and is seen with `status`; the operator asks for `desired`."""

    desired: str
    applied: str | None  # None: no sandbox has the alias
    expected: Convergence
    record_status: str = "running"
    observed_status: str | None = "running"
    record_substrate: str | None = None  # default: the applied plan's
    with_applied_plan: bool = True


CASES = {
    "no record: create": Case("goose", None, Convergence("create", ["no sandbox has this alias"])),
    "no record, other substrate: still create": Case("local", None, Convergence("create", ["no sandbox has this alias"])),
    "recorded on ec2, plan says local: replace": Case(
        "local", "goose", Convergence("replace", ["it runs on ec2, the plan says local"])
    ),
    "recorded on local, plan says ec2: replace": Case(
        "goose", "local", Convergence("replace", ["it runs on local, the plan says ec2"])
    ),
    "substrate differs even when otherwise up to date": Case(
        "goose", "goose", Convergence("replace", ["it runs on local, the plan says ec2"]), record_substrate="local"
    ),
    "observed failed: replace": Case(
        "goose", "goose", Convergence("replace", ["the existing sandbox is failed"]), observed_status="failed"
    ),
    "observed starting (its creator is gone): replace": Case(
        "goose",
        "goose",
        Convergence("replace", ["the existing sandbox is starting"]),
        record_status="starting",
        observed_status="starting",
    ),
    "record starting, nothing observed: replace": Case(
        "goose",
        "goose",
        Convergence("replace", ["the existing sandbox is starting"]),
        record_status="starting",
        observed_status=None,
    ),
    "record failed, nothing observed: replace": Case(
        "goose",
        "goose",
        Convergence("replace", ["the existing sandbox is failed"]),
        record_status="failed",
        observed_status=None,
    ),
    "record failed but the host shows it stopped: the live status wins": Case(
        "goose", "goose", Convergence("none"), record_status="failed", observed_status="stopped"
    ),
    "record says running, observed stopped: nothing to do": Case(
        "goose", "goose", Convergence("none"), observed_status="stopped"
    ),
    "paused and up to date: nothing to do": Case(
        "goose", "goose", Convergence("none"), record_status="paused", observed_status="paused"
    ),
    "instance type changed: replace": Case(
        "bigger", "goose", Convergence("replace", [RUNTIME_REASON], ["spec.runtime.instanceType"])
    ),
    "instance type changed back: replace": Case(
        "goose", "bigger", Convergence("replace", [RUNTIME_REASON], ["spec.runtime.instanceType"])
    ),
    "first-boot commands changed: replace": Case(
        "setup", "goose", Convergence("replace", [RUNTIME_REASON], ["spec.execution.initCommands"])
    ),
    "runtime and policy both changed: replace, listing both": Case(
        "bigger-and-wider",
        "goose",
        Convergence("replace", [RUNTIME_REASON], ["spec.network.egress.allowedDNSSuffixes", "spec.runtime.instanceType"]),
    ),
    "runtime changed, no applied plan kept: replace without fields": Case(
        "bigger", "goose", Convergence("replace", [RUNTIME_REASON]), with_applied_plan=False
    ),
    "egress allowlist changed: update in place": Case(
        "wider", "goose", Convergence("update", [POLICY_REASON], ["spec.network.egress.allowedDNSSuffixes"])
    ),
    "environment changed: update in place": Case(
        "env", "goose", Convergence("update", [POLICY_REASON], ["spec.execution.env.GOOSE_MODE"])
    ),
    "config files changed: update in place": Case(
        "settings", "goose", Convergence("update", [POLICY_REASON], ["spec.execution.configFiles./home/sandbox/.gitconfig"])
    ),
    "policy changed on a stopped sandbox: update": Case(
        "wider",
        "goose",
        Convergence("update", [POLICY_REASON], ["spec.network.egress.allowedDNSSuffixes"]),
        record_status="stopped",
        observed_status="stopped",
    ),
    "policy changed, no applied plan kept: update without fields": Case(
        "env", "goose", Convergence("update", [POLICY_REASON]), with_applied_plan=False
    ),
    "same plan: nothing to do": Case("goose", "goose", Convergence("none")),
    "same local plan: nothing to do": Case("local", "local", Convergence("none")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_convergence(case: Case, plans: dict[str, dict[str, Any]]) -> None:
    desired = plans[case.desired]
    if case.applied is None:
        observed = Observed(None)
    else:
        applied = plans[case.applied]
        record = record_for(
            applied, status=case.record_status, substrate=case.record_substrate or applied["sandbox"]["substrate"]
        )
        observed = Observed(record, case.observed_status, applied if case.with_applied_plan else None)
    assert plan_convergence(desired, observed) == case.expected


@pytest.mark.parametrize("observed_status", ["running", "stopped", "paused"])
def test_a_record_starting_with_a_live_status_is_judged_by_the_live_status(
    observed_status: str, plans: dict[str, dict[str, Any]]
) -> None:
    record = record_for(plans["goose"], status="starting")
    assert plan_convergence(plans["goose"], Observed(record, observed_status, plans["goose"])).action == "none"


@pytest.mark.parametrize("desired", ["goose", "bigger", "wider"])
def test_creating_means_another_process_is_at_work(desired: str, plans: dict[str, dict[str, Any]]) -> None:
    record = record_for(plans["goose"], status="starting", sandbox_id="gebpfgk-feedbeef")
    with pytest.raises(SandboxBusy) as raised:
        plan_convergence(plans[desired], Observed(record, "creating", plans["goose"]))
    assert "goose" in str(raised.value) and "gebpfgk-feedbeef" in str(raised.value)
    assert "wait" in str(raised.value)


def test_a_sandbox_being_created_is_busy_whatever_the_plan_says(plans: dict[str, dict[str, Any]]) -> None:
    record = record_for(plans["goose"], status="starting")
    with pytest.raises(SandboxBusy):
        plan_convergence(plans["local"], Observed(record, "creating", plans["goose"]))


def test_convergence_reads_the_built_in_profile_the_same_as_its_goose_variant(
    plans: dict[str, dict[str, Any]],
) -> None:
    """The reference plans above are the shipped profile's: a record from `km create goose` is up to date."""
    profile, _ = load_profile(BUILTIN_PROFILES_DIR / "goose.yaml")
    shipped = compile_profile(profile).plan
    assert shipped["hashes"] == plans["goose"]["hashes"]
    assert plan_convergence(shipped, Observed(record_for(plans["goose"]), "running", plans["goose"])) == Convergence("none")


# ---- changed_fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({}, {}, []),
        ({"a": 1}, {"a": 1}, []),
        ({"a": 1}, {"a": 2}, ["a"]),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, ["a.c"]),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}, ["a.b.c"]),
        ({"a": 1}, {}, ["a"]),
        ({}, {"a": 1}, ["a"]),
        ({"z": 1, "a": 1, "m": 1}, {"z": 2, "a": 2, "m": 2}, ["a", "m", "z"]),
        ({"a": [1, 2]}, {"a": [1, 2]}, []),
        ({"a": [1, 2]}, {"a": [2, 1]}, ["a"]),
        ({"a": [{"b": 1}]}, {"a": [{"b": 2}]}, ["a"]),
        ({"a": {"b": 1}}, {"a": 5}, ["a"]),
        ({"a": {"b": 1}}, {}, ["a"]),
        (1, 2, [""]),
        ("same", "same", []),
    ],
    ids=[
        "empty",
        "equal",
        "scalar",
        "nested",
        "deep",
        "removed",
        "added",
        "sorted",
        "equal list",
        "list whole",
        "list of maps whole",
        "map to scalar",
        "removed map",
        "top-level scalars",
        "top-level equal",
    ],
)
def test_changed_fields(old: Any, new: Any, expected: list[str]) -> None:
    assert changed_fields(old, new) == expected


def test_changed_fields_prefix_starts_every_path() -> None:
    assert changed_fields({"a": 1, "b": {"c": 1}}, {"a": 2, "b": {"c": 2}}, prefix="spec") == ["spec.a", "spec.b.c"]


def test_changed_fields_between_compiled_profiles(plans: dict[str, dict[str, Any]]) -> None:
    assert changed_fields(plans["goose"]["profile"], plans["goose"]["profile"]) == []
    assert changed_fields(plans["goose"]["profile"], plans["local"]["profile"]) == ["spec.runtime.substrate"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abcd"), children, max_size=4),
    max_leaves=12,
)


@given(_json, _json)
def test_changed_fields_is_symmetric_without_repeats(old: Any, new: Any) -> None:
    paths = changed_fields(old, new)
    assert paths == changed_fields(new, old)
    assert len(set(paths)) == len(paths)
    if old == new:
        assert paths == []
    elif not (isinstance(old, dict) and isinstance(new, dict)):
        assert paths == [""]


@given(_json)
def test_a_value_never_differs_from_itself(value: Any) -> None:
    assert changed_fields(value, value) == []


# ---- describe --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("convergence", "expected"),
    [
        (Convergence("none"), "goose: up to date"),
        (Convergence("create", ["no sandbox has this alias"]), "goose: create: no sandbox has this alias"),
        (
            Convergence("replace", ["the existing sandbox is failed"]),
            "goose: replace: the existing sandbox is failed",
        ),
        (
            Convergence("replace", [RUNTIME_REASON], ["spec.runtime.instanceType"]),
            f"goose: replace (spec.runtime.instanceType): {RUNTIME_REASON}",
        ),
        (
            Convergence("update", [POLICY_REASON], ["spec.execution.env.A", "spec.network.egress.allowedDNSSuffixes"]),
            f"goose: update in place (spec.execution.env.A, spec.network.egress.allowedDNSSuffixes): {POLICY_REASON}",
        ),
        (Convergence("update", ["one", "two"]), "goose: update in place: one; two"),
        (Convergence("none", ["ignored"], ["ignored.field"]), "goose: up to date"),
    ],
    ids=["none", "create", "replace", "replace with fields", "update with fields", "reasons joined", "none says only that"],
)
def test_describe(convergence: Convergence, expected: str) -> None:
    assert convergence.describe("goose") == expected


def test_describe_uses_the_alias_it_is_given(plans: dict[str, dict[str, Any]]) -> None:
    convergence = plan_convergence(plans["wider"], Observed(record_for(plans["goose"], alias="work"), "running", plans["goose"]))
    assert convergence.describe("work").startswith("work: update in place (spec.network.egress.allowedDNSSuffixes): ")


def test_convergence_defaults_are_not_shared() -> None:
    first, second = Convergence("none"), Convergence("none")
    first.reasons.append("x")
    assert second.reasons == []


def test_plan_convergence_does_not_modify_its_inputs(tmp_path: Path) -> None:
    desired = compile_profile(goose_variant(tmp_path, VARIANTS["bigger"])).plan
    applied = compile_profile(goose_variant(tmp_path)).plan
    before = (repr(desired), repr(applied))
    plan_convergence(desired, Observed(record_for(applied), "running", applied))
    assert (repr(desired), repr(applied)) == before


def test_an_interrupted_create_is_finished_where_the_substrate_can_and_the_plan_is_the_same(
    plans: dict[str, dict[str, Any]],
) -> None:
    record = record_for(plans["goose"], status="starting")
    finishing = Observed(record, "starting", None, finishes_interrupted=True)
    assert plan_convergence(plans["goose"], finishing).action == "finish"
    assert "interrupted" in plan_convergence(plans["goose"], finishing).describe("goose")


@pytest.mark.parametrize(
    ("desired", "finishes"), [("goose", False), ("bigger", True), ("wider", True)], ids=["cannot-finish", "runtime", "policy"]
)
def test_an_interrupted_create_is_replaced_when_it_cannot_be_finished_as_planned(
    desired: str, finishes: bool, plans: dict[str, dict[str, Any]]
) -> None:
    """Finishing keeps what the killed create made, which is only right for the same plan."""
    record = record_for(plans["goose"], status="starting")
    observed = Observed(record, "starting", None, finishes_interrupted=finishes)
    assert plan_convergence(plans[desired], observed).action == "replace"
