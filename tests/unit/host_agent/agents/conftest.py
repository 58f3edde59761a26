"""Runs an adapter's invocation for real, against the fake agent CLIs, the way the run wrapper would."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_agent.agents import AgentAdapter, AgentInvocation
from tests.conftest import REPO_ROOT

FAKE_AGENTS_DIR = REPO_ROOT / "tests" / "fakes" / "agents"


@dataclass(frozen=True)
class FinishedRun:
    invocation: AgentInvocation
    stdout: bytes
    exit_code: int
    stderr_tail: str


RunAgent = Callable[..., FinishedRun]


def agent_env(invocation: AgentInvocation, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment with the fakes first on PATH, plus what the invocation asks for."""
    return {**os.environ, "PATH": f"{FAKE_AGENTS_DIR}{os.pathsep}{os.environ['PATH']}", **invocation.env, **(extra_env or {})}


@pytest.fixture
def run_agent(tmp_path: Path) -> RunAgent:
    def run(
        adapter: AgentAdapter,
        prompt: str,
        extra_args: Sequence[str] = (),
        command: str | None = None,
        env: dict[str, str] | None = None,
    ) -> FinishedRun:
        prompt_file = tmp_path / "prompt.md"
        prompt_file.write_text(prompt)
        invocation = adapter.invocation(prompt_file, extra_args, command)
        with prompt_file.open("rb") as prompt_stream:
            completed = subprocess.run(
                invocation.argv,
                stdin=prompt_stream if invocation.prompt_on_stdin else subprocess.DEVNULL,
                capture_output=True,
                env=agent_env(invocation, env),
                timeout=60,
            )
        return FinishedRun(invocation, completed.stdout, completed.returncode, completed.stderr.decode()[-4096:])

    return run
