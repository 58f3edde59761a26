"""Agent runs end to end on this host: the real daemon, a real tmux server, the fake agent CLIs.

Everything a sandbox runs is here except the machine: the daemon takes runs on its control socket,
starts each in a tmux session on a tmux server owned by the test's user, the wrapper executes a fake
agent and records the end, and `km-host-agent run|results|list|status|cancel` read it back. The same
flows run inside a real sandbox in tests/sandbox/test_agent_runs.py.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from controller.profile import BUILTIN_PROFILES_DIR, ProfileResolver, load_profile
from host_agent.config import HostAgentConfig
from tests.conftest import REPO_ROOT

FAKES = REPO_ROOT / "tests/fakes/agents"
TIMEOUT = 30.0


def goose_config(working_dir: Path, fake_log: Path) -> HostAgentConfig:
    loaded, _ = load_profile(BUILTIN_PROFILES_DIR / "goose.yaml", ProfileResolver())
    config = compile_profile(loaded).host_agent
    env = {**config.execution.env, "PATH": f"{FAKES}:/usr/bin:/bin", "KM_FAKE_LOG": str(fake_log)}
    execution = config.execution.model_copy(update={"working_dir": str(working_dir), "env": env})
    return config.model_copy(update={"execution": execution})


@dataclass
class HostAgent:
    """A running daemon and the paths its control commands need."""

    process: subprocess.Popen[str]
    config: Path
    control_socket: Path
    working_dir: Path
    artifacts: Path
    fake_log: Path
    args: list[str]

    def command(self, *args: str, prompt: str | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "host_agent.cli",
                *args,
                "--config",
                str(self.config),
                "--control-socket",
                str(self.control_socket),
            ],
            input=prompt if prompt is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO_ROOT,
        )

    def json(self, *args: str, prompt: str | None = None, expect: int = 0) -> Any:
        completed = self.command(*args, prompt=prompt)
        assert completed.returncode == expect, (completed.returncode, completed.stdout, completed.stderr)
        return json.loads(completed.stdout)

    def run_dir(self, run_id: str) -> Path:
        return self.working_dir / ".km-agent/runs" / run_id

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_daemon(agent: HostAgent) -> HostAgent:
    agent.control_socket.unlink(missing_ok=True)
    agent.process = subprocess.Popen(
        [sys.executable, "-m", "host_agent.cli", "daemon", *agent.args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not agent.control_socket.exists():
        assert agent.process.poll() is None, "the daemon exited at start"
        assert time.monotonic() < deadline, "the daemon did not open its control socket"
        time.sleep(0.05)
    return agent


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths hold 108 bytes; pytest's tmp_path can be longer."""
    directory = Path(tempfile.mkdtemp(prefix="km-runs-"))
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture
def tmux_socket(short_dir: Path) -> Iterator[Path]:
    """km's tmux server, as the sandbox's km-agent-tmux unit would run it (here: as the test's user)."""
    socket_path = short_dir / "tmux.sock"
    server = subprocess.Popen(["tmux", "-S", str(socket_path), "-f", "/dev/null", "-D"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not socket_path.exists():
        assert time.monotonic() < deadline, "tmux did not start"
        time.sleep(0.02)
    yield socket_path
    server.terminate()
    server.wait(timeout=TIMEOUT)


@pytest.fixture
def host_agent(tmp_path: Path, short_dir: Path, tmux_socket: Path) -> Iterator[HostAgent]:
    working_dir = tmp_path / "workspace"
    working_dir.mkdir()
    fake_log = tmp_path / "fake-agents.log"
    config = tmp_path / "host-agent.json"
    config.write_text(goose_config(working_dir, fake_log).to_json())
    artifacts = tmp_path / "artifacts"
    identity = tmp_path / "sandbox.env"
    identity.write_text(f"KM_SANDBOX_ID=sb-0123abcd\nKM_ARTIFACTS_URI=file://{artifacts}\n")
    control_socket = short_dir / "control.sock"
    args = [
        "--config", str(config), "--identity", str(identity), "--control-socket", str(control_socket),
        "--tmux-socket", str(tmux_socket), "--state-dir", str(tmp_path / "state"),
        "--sandbox-user", pwd.getpwuid(os.getuid()).pw_name,
    ]  # fmt: skip
    agent = HostAgent(subprocess.Popen(["true"]), config, control_socket, working_dir, artifacts, fake_log, args)
    start_daemon(agent)
    yield agent
    agent.stop()


def wait_for_status(agent: HostAgent, run_id: str, statuses: set[str], timeout: float = TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        summary: dict[str, Any] = agent.json("status", "--run", run_id)
        if summary["status"] in statuses:
            return summary
        assert time.monotonic() < deadline, f"run {run_id} still {summary['status']}"
        time.sleep(0.05)


def wait_until(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the happy paths, one per agent --------------------------------------------------------------


def test_claude_run_waits_and_prints_the_normalised_result(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent", "claude", "--wait", prompt="Fix the flaky test\nmore detail")
    assert result["status"] == "complete" and result["is_error"] is False
    assert result["agent"] == "claude" and result["sandbox_id"] == "sb-0123abcd"
    assert result["result"].startswith("Done: Fix the flaky test")
    assert result["num_turns"] == 3 and result["total_cost_usd"] == pytest.approx(0.0213834)
    assert result["usage"] == {
        "input_tokens": 12,
        "output_tokens": 156,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 10240,
    }
    assert result["session_id"] and result["raw"]["type"] == "result"
    run_dir = host_agent.run_dir(result["run_id"])
    assert (run_dir / "prompt").read_text() == "Fix the flaky test\nmore detail"
    assert json.loads((run_dir / "output.json").read_text())["subtype"] == "success"
    assert (run_dir / "status").read_text() == "complete" and (run_dir / "exit_code").read_text() == "0"
    assert (run_dir / "started_at").read_text() <= (run_dir / "ended_at").read_text()
    assert json.loads((run_dir / "result.json").read_text()) == result


@pytest.mark.parametrize(
    ("agent", "expected_output"),
    [("codex", "output.jsonl"), ("goose", "output.jsonl")],
)
def test_codex_and_goose_runs_normalise_their_own_formats(host_agent: HostAgent, agent: str, expected_output: str) -> None:
    result = host_agent.json("run", "--agent", agent, "--wait", prompt="Add a README section")
    assert result["status"] == "complete" and result["agent"] == agent
    assert "Add a README section" in result["result"]
    assert result["usage"]["input_tokens"] and result["usage"]["output_tokens"]
    if agent == "codex":  # no native cost: computed from its tokens at the default model's list price
        assert result["total_cost_usd"] > 0
    run_dir = host_agent.run_dir(result["run_id"])
    assert any(path.name.startswith("output.") for path in run_dir.iterdir())


def test_a_custom_agent_command_gets_the_prompt_on_stdin(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent-cmd", "tr a-z A-Z", "--agent", "custom", "--wait", prompt="shout this")
    assert result["status"] == "complete" and result["result"].strip() == "SHOUT THIS"
    assert result["total_cost_usd"] is None and result["num_turns"] is None


def test_fire_and_forget_returns_at_once_with_the_run_id(host_agent: HostAgent) -> None:
    started = host_agent.json("run", "--agent", "claude", prompt="KM_FAKE_SLEEP=2 take your time")
    assert started["session"] == f"km-agent-{started['run_id']}"
    assert host_agent.json("status", "--run", started["run_id"])["status"] in ("queued", "running")
    done = wait_for_status(host_agent, started["run_id"], {"complete"})
    assert done["exit_code"] == 0 and done["agent"] == "claude"
    assert host_agent.json("results")["run_id"] == started["run_id"]  # latest by default


# ---- failures ------------------------------------------------------------------------------------


def test_an_agent_that_fails_gives_exit_1_and_a_failed_result(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent", "claude", "--wait", prompt="KM_FAKE_FAIL please", expect=1)
    assert result["status"] == "failed" and result["is_error"] is True and result["exit_code"] == 1
    assert result["error"]
    assert (host_agent.run_dir(result["run_id"]) / "failure_reason").read_text()


def test_claude_is_error_with_exit_0_is_still_a_failed_run(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent", "claude", "--wait", prompt="KM_FAKE_IS_ERROR", expect=1)
    assert result["status"] == "failed" and result["exit_code"] == 0


def test_goose_silent_exit_1_is_a_failed_run_with_a_reason(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent", "goose", "--wait", prompt="KM_FAKE_FAIL", expect=1)
    assert result["status"] == "failed" and result["error"] and result["result"] is None


def test_an_agent_missing_from_path_fails_the_run_not_the_daemon(host_agent: HostAgent) -> None:
    result = host_agent.json("run", "--agent-cmd", "exec no-such-agent-cli", "--agent", "custom", "--wait", prompt="x", expect=1)
    assert result["status"] == "failed" and result["exit_code"] == 127
    assert host_agent.json("health")["profile"] == "goose"


def test_bad_requests_are_refused_with_a_reason(host_agent: HostAgent) -> None:
    empty = host_agent.command("run", "--agent", "claude", prompt="   ")
    assert empty.returncode == 1 and "prompt is empty" in empty.stderr
    missing = host_agent.command("results", "--run", "20000101T000000Z-000000")
    assert missing.returncode == 1 and "no run" in missing.stderr


# ---- environment ---------------------------------------------------------------------------------


def test_the_profile_bedrock_settings_reach_the_agent_unless_no_bedrock(host_agent: HostAgent) -> None:
    with_bedrock = host_agent.json("run", "--agent", "claude", "--wait", prompt="KM_FAKE_ENV=CLAUDE_CODE_USE_BEDROCK")
    assert "[CLAUDE_CODE_USE_BEDROCK=1]" in with_bedrock["result"]
    without = host_agent.json("run", "--agent", "claude", "--no-bedrock", "--wait", prompt="KM_FAKE_ENV=CLAUDE_CODE_USE_BEDROCK")
    assert "[CLAUDE_CODE_USE_BEDROCK=<unset>]" in without["result"]
    ids = host_agent.json("run", "--agent", "claude", "--wait", prompt="KM_FAKE_ENV=KM_RUN_ID")
    assert f"[KM_RUN_ID={ids['run_id']}]" in ids["result"]


def test_the_agent_is_invoked_headless_with_its_documented_flags(host_agent: HostAgent) -> None:
    host_agent.json("run", "--agent", "claude", "--wait", prompt="hello")
    host_agent.json("run", "--agent", "codex", "--wait", prompt="hello")
    calls = [json.loads(line) for line in host_agent.fake_log.read_text().splitlines()]
    assert calls[0][:4] == ["claude", "-p", "--output-format", "json"]
    assert calls[1][:3] == ["codex", "exec", "--json"]


# ---- list, cancel, restart -----------------------------------------------------------------------


def test_list_shows_every_run_oldest_first(host_agent: HostAgent) -> None:
    first = host_agent.json("run", "--agent", "claude", "--wait", prompt="one")
    second = host_agent.json("run", "--agent", "codex", "--wait", prompt="two")
    listed = host_agent.json("list")
    assert [run["run_id"] for run in listed] == [first["run_id"], second["run_id"]]
    assert [run["agent"] for run in listed] == ["claude", "codex"]
    assert listed[0]["total_cost_usd"] == pytest.approx(0.0213834) and listed[0]["size_bytes"] > 0


def test_cancel_stops_the_agent_and_records_cancelled(host_agent: HostAgent, tmux_socket: Path) -> None:
    started = host_agent.json("run", "--agent", "claude", prompt="KM_FAKE_SLEEP=60 long job")
    wait_for_status(host_agent, started["run_id"], {"running"})
    wait_until(host_agent.fake_log.exists, "the fake agent to start")
    session = ["tmux", "-S", str(tmux_socket), "has-session", "-t", f"={started['session']}"]
    assert subprocess.run(session, check=False).returncode == 0, "the run is not in its tmux session"
    cancelled = host_agent.json("cancel", "--run", started["run_id"])
    assert cancelled["status"] == "cancelled"
    result = host_agent.json("results", "--run", started["run_id"])
    assert result["status"] == "cancelled" and result["is_error"] is True
    fakes = subprocess.run(["pgrep", "-f", f"{FAKES}/claude"], capture_output=True, text=True).stdout.split()
    assert fakes == [], "the agent outlived its cancelled run"
    assert subprocess.run(session, check=False, capture_output=True).returncode == 1, "the session outlived the run"


def test_a_run_survives_a_daemon_restart_and_its_end_is_recorded(host_agent: HostAgent) -> None:
    started = host_agent.json("run", "--agent", "claude", prompt="KM_FAKE_SLEEP=3 survive a restart")
    wait_for_status(host_agent, started["run_id"], {"running"})
    host_agent.stop()
    start_daemon(host_agent)
    done = wait_for_status(host_agent, started["run_id"], {"complete", "failed"})
    assert done["status"] == "complete"
    assert host_agent.json("results", "--run", started["run_id"])["result"].startswith("Done: KM_FAKE_SLEEP=3")


def test_a_wrapper_killed_without_recording_is_marked_failed_by_the_daemon(host_agent: HostAgent) -> None:
    started = host_agent.json("run", "--agent", "claude", prompt="KM_FAKE_SLEEP=60 doomed")
    wait_for_status(host_agent, started["run_id"], {"running"})
    runner_pid = int((host_agent.run_dir(started["run_id"]) / "runner.pid").read_text())
    os.kill(runner_pid, signal.SIGKILL)
    failed = wait_for_status(host_agent, started["run_id"], {"failed"})
    assert "without recording" in failed["failure_reason"]
    subprocess.run(["pkill", "-f", f"{FAKES}/claude"], check=False)


def test_root_reading_a_run_refuses_a_symlinked_result(host_agent: HostAgent, tmp_path: Path) -> None:
    result = host_agent.json("run", "--agent", "claude", "--wait", prompt="ok")
    secret = tmp_path / "secret"
    secret.write_text('{"stolen": true}')
    result_file = host_agent.run_dir(result["run_id"]) / "result.json"
    result_file.unlink()
    result_file.symlink_to(secret)
    refused = host_agent.command("results", "--run", result["run_id"])
    assert refused.returncode == 1 and "stolen" not in refused.stdout
    assert refused.stderr.startswith("km-host-agent: ") and "refusing to read" in refused.stderr
