"""`km agent …` against a real local sandbox made from the goose profile, with the fake agent CLIs.

The fakes go first on the sandbox user's PATH (~/.local/bin), ahead of the real Claude Code the goose
profile installs, so no paid model is ever called. Everything else is the product: km on the host,
nsenter into the machine, the host agent's control socket, km's tmux server as the sandbox user, the
run wrapper, the outbox uploading into the host's artifacts directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.images.store import Image
from tests.conftest import REPO_ROOT
from tests.sandbox.test_local_lifecycle import KM, km

pytestmark = pytest.mark.root
ALIAS = "agents"
FAKES = REPO_ROOT / "tests/fakes/agents"


def agent_json(*args: str, expect: int = 0) -> Any:
    result = km("agent", *args, check=False)
    assert result.returncode == expect, f"km agent {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def wait_for(condition: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def run_summary(run_id: str) -> dict[str, Any]:
    runs = agent_json("list", ALIAS, "--json")
    return next(run for run in runs if run["run_id"] == run_id)


@pytest.fixture(scope="module")
def goose_sandbox(local_env: Path, debian_image: Image) -> Iterator[str]:
    """The goose profile, verbatim, with the fake agents installed for the sandbox user."""
    created = km("create", "goose", "--alias", ALIAS, "--substrate", "local", "--json")
    sandbox_id = str(json.loads(created.stdout)["sandbox"]["id"])
    try:
        for fake in sorted(FAKES.iterdir()):
            install = f"mkdir -p ~/.local/bin && cat > ~/.local/bin/{fake.name} && chmod 755 ~/.local/bin/{fake.name}"
            result = km("shell", ALIAS, "--", "sh", "-c", install, stdin=fake.read_text())
            assert result.returncode == 0, result.stderr
        yield sandbox_id
    finally:
        km("destroy", sandbox_id, "--yes", check=False)


def test_wait_prints_the_normalised_result_and_exits_0(goose_sandbox: str) -> None:
    result = agent_json("run", ALIAS, "--prompt", "Summarise the repo", "--wait")
    assert result["status"] == "complete" and result["agent"] == "claude" and result["sandbox_id"] == goose_sandbox
    assert result["result"].startswith("Done: Summarise the repo") and result["total_cost_usd"] > 0
    assert set(result["usage"]) == {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}


@pytest.mark.parametrize("flag", ["--codex", "--goose"])
def test_codex_and_goose_fakes_run_with_their_flags(goose_sandbox: str, flag: str) -> None:
    result = agent_json("run", ALIAS, "--prompt", "Write tests", flag, "--wait")
    assert result["status"] == "complete" and result["agent"] == flag.removeprefix("--")
    assert "Write tests" in result["result"]


def test_the_agent_runs_as_the_sandbox_user_in_the_agent_cgroup_with_the_profile_env(goose_sandbox: str) -> None:
    probe = "id -un; tail -1 /proc/self/cgroup; echo bedrock=${CLAUDE_CODE_USE_BEDROCK:-unset} region=${AWS_REGION:-unset}; pwd"
    result = agent_json("run", ALIAS, "--prompt", "x", "--agent-cmd", probe, "--wait")
    user, cgroup, env, cwd = result["result"].splitlines()
    assert user == "sandbox" and cgroup.startswith("0::/kmagent.slice/") and cwd == "/workspace"
    assert env == "bedrock=1 region=us-east-1"  # goose: useBedrock, region from the profile
    without = agent_json("run", ALIAS, "--prompt", "x", "--agent-cmd", probe, "--no-bedrock", "--wait")
    assert without["result"].splitlines()[2] == "bedrock=unset region=unset"


def test_a_failing_agent_exits_1_with_a_failed_result(goose_sandbox: str) -> None:
    result = agent_json("run", ALIAS, "--prompt", "KM_FAKE_FAIL now", "--wait", expect=1)
    assert result["status"] == "failed" and result["is_error"] is True and result["error"]
    goose = agent_json("run", ALIAS, "--prompt", "KM_FAKE_FAIL now", "--goose", "--wait", expect=1)
    assert goose["status"] == "failed" and "without a result" in goose["error"]


def test_fire_and_forget_then_list_results_and_the_uploaded_copy(goose_sandbox: str, local_env: Path) -> None:
    started = km("agent", "run", ALIAS, "--prompt", "KM_FAKE_SLEEP=2 background job")
    run_id = started.stdout.strip()
    assert run_summary(run_id)["status"] in ("queued", "running")
    wait_for(lambda: run_summary(run_id)["status"] == "complete", "the run to complete")
    results = agent_json("results", ALIAS)
    assert results["run_id"] == run_id and results["result"].startswith("Done: KM_FAKE_SLEEP=2")
    uploaded = local_env / "artifacts" / "agent-runs" / goose_sandbox / run_id
    wait_for(lambda: (uploaded / "status").exists() and (uploaded / "status").read_text() == "complete", "the upload")
    assert json.loads((uploaded / "result.json").read_text()) == results
    assert (uploaded / "prompt").read_text() == "KM_FAKE_SLEEP=2 background job"
    table = km("agent", "list", ALIAS).stdout
    assert run_id in table and "complete" in table
    health = json.loads(km("status", ALIAS, "--json").stdout)["host_agent"]
    assert health["status"] == "active" and health["active_runs"] == []
    assert health["outbox"]["pending"] == 0 and health["outbox"]["uploaded"] > 0


def test_cancel_ends_a_running_agent(goose_sandbox: str) -> None:
    run_id = km("agent", "run", ALIAS, "--prompt", "KM_FAKE_SLEEP=120 forever").stdout.strip()
    wait_for(lambda: run_summary(run_id)["status"] == "running", "the run to start")
    cancelled = agent_json("cancel", ALIAS, "--run", run_id)
    assert cancelled["status"] == "cancelled"
    assert agent_json("results", ALIAS, "--run", run_id)["status"] == "cancelled"
    # `[.]`: the pattern must not match the shell that runs pgrep.
    left = km("shell", ALIAS, "--root", "--", "sh", "-c", "pgrep -f '[.]local/bin/claude' || true").stdout
    assert left.strip() == ""


def test_a_run_survives_a_host_agent_restart(goose_sandbox: str) -> None:
    run_id = km("agent", "run", ALIAS, "--prompt", "KM_FAKE_SLEEP=4 survive").stdout.strip()
    wait_for(lambda: run_summary(run_id)["status"] == "running", "the run to start")
    restarted = km("shell", ALIAS, "--root", "--", "systemctl", "restart", "km-host-agent")
    assert restarted.returncode == 0, restarted.stderr
    wait_for(lambda: run_summary(run_id)["status"] != "running", "the run to end", timeout=60)
    assert agent_json("results", ALIAS, "--run", run_id)["status"] == "complete"


class HostTmux:
    """The operator's terminal: a tmux server of the test's own, on the host."""

    def __init__(self) -> None:
        self.base = ["tmux", "-L", f"km-agent-test-{os.getpid()}"]
        self.environment = " ".join(f"{key}={shlex.quote(os.environ[key])}" for key in ("KM_STATE_DIR", "KM_SANDBOX_DIR"))

    def start(self, command: str) -> None:
        window = f"{self.environment} {command}; echo km-exit=$?; sleep 60"
        subprocess.run([*self.base, "new-session", "-d", "-s", "op", "-x", "150", "-y", "30", window], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "op"], capture_output=True, text=True).stdout

    def wait_for_text(self, text: str, timeout: float = 60) -> str:
        return str(
            wait_for(lambda: self.screen() if text in self.screen() else "", f"{text!r} on the operator's screen", timeout)
        )

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "op", *keys], check=True)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def operator_terminal() -> Iterator[HostTmux]:
    terminal = HostTmux()
    yield terminal
    terminal.kill()


def test_interactive_shows_the_run_live_and_detaching_leaves_it_running(goose_sandbox: str, operator_terminal: HostTmux) -> None:
    prompt = "KM_FAKE_SLEEP=8 interactive job"
    operator_terminal.start(f"{KM} agent run {ALIAS} --codex --interactive --prompt {shlex.quote(prompt)}")
    operator_terminal.wait_for_text("thread.started")  # codex's first event, printed live in the run's pane
    operator_terminal.keys("C-b", "d")
    screen = operator_terminal.wait_for_text("km-exit=0")
    assert "detached from run" in screen
    run_id = agent_json("list", ALIAS, "--json")[-1]["run_id"]
    assert run_summary(run_id)["status"] == "running"  # detaching did not stop it
    wait_for(lambda: run_summary(run_id)["status"] == "complete", "the detached run to complete")


def test_attach_reaches_a_running_run(goose_sandbox: str, operator_terminal: HostTmux) -> None:
    run_id = km("agent", "run", ALIAS, "--codex", "--prompt", "KM_FAKE_SLEEP=8 attach to me").stdout.strip()
    wait_for(lambda: run_summary(run_id)["status"] == "running", "the run to start")
    operator_terminal.start(f"{KM} agent attach {ALIAS}")
    operator_terminal.wait_for_text("thread.started")
    operator_terminal.keys("C-b", "d")
    operator_terminal.wait_for_text("km-exit=0")
    wait_for(lambda: run_summary(run_id)["status"] == "complete", "the run to complete")


def test_results_come_from_the_uploaded_copy_when_the_sandbox_is_stopped(goose_sandbox: str) -> None:
    done = agent_json("run", ALIAS, "--prompt", "before the stop", "--wait")
    wait_for(lambda: agent_json("results", ALIAS)["run_id"] == done["run_id"], "the latest result")
    km("stop", ALIAS)
    try:
        assert agent_json("results", ALIAS, "--run", done["run_id"])["result"] == done["result"]
        refused = km("agent", "run", ALIAS, "--prompt", "x", check=False)
        assert refused.returncode == 1 and "--auto-start" in refused.stderr
        resumed = agent_json("run", ALIAS, "--prompt", "after auto start", "--auto-start", "--wait")
        assert resumed["status"] == "complete"
    finally:
        km("resume", ALIAS, check=False)


def test_a_running_agent_is_activity_but_the_idle_tmux_server_is_not(goose_sandbox: str) -> None:
    """The idle timeout counts runs, not km's tmux server waiting between them."""
    from controller.substrates.local.reaper import agent_slice_busy

    agent_json("run", ALIAS, "--prompt", "warm up the tmux server", "--wait")
    assert not agent_slice_busy(goose_sandbox)
    run_id = km("agent", "run", ALIAS, "--prompt", "KM_FAKE_SLEEP=5 busy").stdout.strip()
    wait_for(lambda: run_summary(run_id)["status"] == "running", "the run to start")
    assert agent_slice_busy(goose_sandbox)
    wait_for(lambda: run_summary(run_id)["status"] == "complete", "the run to complete")
    assert not agent_slice_busy(goose_sandbox)
