"""The km CLI contract, exercised as operators run it: real subprocesses of the installed commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.profile import load_profile
from tests.conftest import REPO_ROOT

BIN = Path(sys.executable).parent


def km(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "km"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def bad_profile(tmp_path: Path) -> Path:
    text = (REPO_ROOT / "profiles/goose.yaml").read_text()
    text = text.replace("spot: false", "spot: true").replace("    region: us-east-1\n", "    region: us-east-1\n    regoin: x\n")
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    return file


def test_version() -> None:
    assert km("--version").stdout.strip() == "km, version 0.1.0"


def test_validate_valid_profiles_exits_zero() -> None:
    result = km("validate", "goose", "profiles/open-dev.yaml", "base/network/locked")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["profiles/goose.yaml: valid", "profiles/open-dev.yaml: valid"]
    assert "abstract fragment" in result.stdout.splitlines()[2]


def test_validate_reports_file_line_path_and_fix(bad_profile: Path) -> None:
    result = km("validate", str(bad_profile))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    text = bad_profile.read_text().splitlines()
    spot_line = text.index("    spot: true") + 1
    typo_line = text.index("    regoin: x") + 1
    assert f"{bad_profile}:{typo_line}: spec.runtime.regoin: unknown field 'regoin'; did you mean 'region'?" in lines
    assert result.stdout.strip() == f"{bad_profile}: invalid (1 error)"
    assert "Traceback" not in result.stderr
    # Only the unknown field is reported: rules run once the schema holds; fix it and the rule shows.
    bad_profile.write_text("\n".join(line for line in text if "regoin" not in line) + "\n")
    again = km("validate", str(bad_profile))
    assert (
        f"{bad_profile}:{spot_line}: spec.runtime.spot: hibernation requires spot: false (hibernation is on-demand only)"
        in again.stderr.splitlines()
    )


def test_validate_json_lists_every_result(bad_profile: Path) -> None:
    result = km("validate", "--json", "goose", str(bad_profile), "no-such-profile")
    assert result.returncode == 1
    reports = json.loads(result.stdout)
    assert [r["valid"] for r in reports] == [True, False, False]
    assert reports[0]["errors"] == [] and reports[0]["warnings"] == []
    (error,) = reports[1]["errors"]
    assert set(error) >= {"path", "line", "message"}
    assert error["path"] == "spec.runtime.regoin" and isinstance(error["line"], int)
    assert "no profile named 'no-such-profile'" in reports[2]["errors"][0]["message"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: [unclosed\n", "invalid YAML"),
        ("a: 1\na: 2\n", "duplicate key"),
        (
            "apiVersion: klankermaker.ai/v1alpha1\nkind: SandboxProfile\nextends: missing/parent\nmetadata: {name: x}\n",
            "parent profile 'missing/parent' not found",
        ),
    ],
)
def test_broken_inputs_are_one_line_errors_not_tracebacks(tmp_path: Path, text: str, words: str) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(text)
    result = km("validate", str(file))
    assert result.returncode == 1
    assert words in result.stderr and "Traceback" not in result.stderr


def test_profile_show_prints_the_merged_profile_with_defaults() -> None:
    result = km("profile", "show", "open-dev")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    profile, _ = load_profile("open-dev")
    assert shown == profile.dump()
    assert ".golang.org" in shown["spec"]["network"]["egress"]["allowedDNSSuffixes"]  # its own
    assert ".github.com" in shown["spec"]["network"]["egress"]["allowedDNSSuffixes"]  # inherited
    assert json.loads(km("profile", "show", "--json", "open-dev").stdout) == shown


def test_profile_show_refuses_fragments() -> None:
    result = km("profile", "show", "base/platform")
    assert result.returncode == 1
    assert "abstract fragment" in result.stderr


def test_profile_list_marks_fragments() -> None:
    listed = json.loads(km("profile", "list", "--json").stdout)
    by_name = {entry["name"]: entry["abstract"] for entry in listed}
    assert by_name["goose"] is False and by_name["base/platform"] is True
    assert {"goose", "open-dev", "restricted-dev", "hardened", "sealed", "claude", "codex"} <= set(by_name)


def test_compile_writes_the_plan_files_and_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "goose"
    first = km("compile", "goose", "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["host-agent.json", "iam-policy.json", "plan.json", "userdata.sh"]
    assert summary["hash"] == json.loads((out / "plan.json").read_text())["hash"]
    assert len(summary["changed"]) == 4
    second = km("compile", "goose", "--out", str(out))
    assert second.stdout.strip().endswith(f"(up to date; plan {summary['hash'][:12]})")


def test_compile_defaults_to_build_name_and_honours_image_devices(tmp_path: Path) -> None:
    result = km("compile", str(REPO_ROOT / "profiles/goose.yaml"), "--ami-block-device", "/dev/xvdf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "build/goose/plan.json").read_text())
    assert [v["device"] for v in plan["volumes"] if v["kind"] == "ebs"] == ["/dev/sdg"]


def test_compile_refuses_invalid_profiles(bad_profile: Path, tmp_path: Path) -> None:
    result = km("compile", str(bad_profile), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "unknown field 'regoin'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_host_agent_reports_its_version_and_checks_a_compiled_config(tmp_path: Path) -> None:
    agent = str(BIN / "km-host-agent")
    assert subprocess.run([agent, "--version"], capture_output=True, text=True).stdout.strip() == "km-host-agent 0.1.0"
    km("compile", "goose", "--out", str(tmp_path))
    checked = subprocess.run(
        [agent, "check-config", "--config", str(tmp_path / "host-agent.json")], capture_output=True, text=True
    )
    assert checked.returncode == 0 and "profile goose, enforcement both" in checked.stdout
    (tmp_path / "broken.json").write_text('{"profile": "x"}')
    broken = subprocess.run([agent, "check-config", "--config", str(tmp_path / "broken.json")], capture_output=True, text=True)
    assert broken.returncode == 1 and "Field required" in broken.stderr


def test_agent_run_refuses_wait_with_interactive_and_two_agents() -> None:
    both = km("agent", "run", "goose", "--prompt", "x", "--wait", "--interactive")
    assert both.returncode == 2 and "--wait and --interactive" in both.stderr
    two = km("agent", "run", "goose", "--prompt", "x", "--codex", "--agent-cmd", "aider")
    assert two.returncode == 2 and "--codex and --agent-cmd" in two.stderr


def test_agent_run_with_an_unreadable_prompt_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    result = km("agent", "run", "goose", "--prompt", f"@{missing}")
    assert result.returncode == 1 and result.stderr.startswith(f"km: --prompt @{missing}: cannot read")


def test_agent_commands_on_an_unknown_sandbox_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KM_STATE_DIR", str(tmp_path))
    for args in (["results", "ghost"], ["list", "ghost"], ["cancel", "ghost"], ["attach", "ghost"]):
        result = km("agent", *args)
        assert result.returncode == 1 and "ghost" in result.stderr and result.stderr.startswith("km: "), (args, result.stderr)
