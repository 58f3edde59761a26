"""The daemon's agent-runs component: start runs, cancel them, and notice the ones that died unrecorded.

Starting a run means: a run dir owned by the sandbox user holding the prompt and a `request.json` that
says exactly what to execute and with which environment (the profile's env, its Bedrock settings
unless `--no-bedrock`), then a tmux session running the wrapper on it. The wrapper records the end
itself; `reconcile` covers the rest (a wrapper killed with -9, a machine that lost power) by checking
that each unfinished run's wrapper is still alive, so no run stays `running` forever.
"""

from __future__ import annotations

import json
import logging
import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from host_agent.agents import AGENT_NAMES, AgentOutcome
from host_agent.agents.base import token_usage
from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.runs.layout import (
    CANCEL_REQUESTED,
    ENDED_AT,
    FAILURE_REASON,
    PROMPT,
    REQUEST,
    RESULT,
    RUNNER_PID,
    RUNS_SUBDIR,
    STATUS,
    TERMINAL,
    RunDir,
    all_runs,
    find_run,
    new_run_id,
    runs_root,
    utc_now,
)
from host_agent.runs.runner import normalised_result
from host_agent.runs.safe_fs import make_owned_dirs, write_owned_file
from host_agent.runs.sessions import RunSessions

log = logging.getLogger("km-host-agent.runs")

SANDBOX_USER: Final = "sandbox"
# Variables that point Claude Code at Bedrock; `--no-bedrock` removes them wherever they came from.
BEDROCK_VARIABLES: Final = (
    "CLAUDE_CODE_USE_BEDROCK",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_BEDROCK_BASE_URL",
    "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    "ANTHROPIC_DEFAULT_OPUS_MODEL",
)
START_GRACE_SECONDS: Final = 30.0


class RunRequestError(ValueError):
    """A run request the daemon refuses; the message names the field and the fix."""


@dataclass(frozen=True)
class SandboxUser:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str = SANDBOX_USER) -> SandboxUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError as error:
            raise RunRequestError(f"there is no {name!r} user in this sandbox (first boot did not finish?)") from error
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def agent_environment(
    config: HostAgentConfig, identity: SandboxIdentity, user: SandboxUser, *, no_bedrock: bool, extra: dict[str, str]
) -> dict[str, str]:
    """A clean environment: login basics, the profile's env and Bedrock settings, the adapter's, km's own."""
    env = {
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": config.execution.shell,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        "PATH": f"{user.home}/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    if not no_bedrock:
        env.update(config.execution.bedrock_env)
    env.update(config.execution.env)
    if no_bedrock:
        for name in (*config.execution.bedrock_env, *BEDROCK_VARIABLES):
            env.pop(name, None)
    env.update(extra)
    env["KM_SANDBOX_ID"] = identity.sandbox_id
    return env


class AgentRuns:
    def __init__(
        self, config: HostAgentConfig, identity: SandboxIdentity, sessions: RunSessions, user_name: str = SANDBOX_USER
    ) -> None:
        self.config = config
        self.identity = identity
        self.sessions = sessions
        self.user_name = user_name
        self._user: SandboxUser | None = None
        # Runs whose session start() is still making (it may wait seconds for km's tmux server to start):
        # reconcile, on the daemon's loop, must not take their missing wrapper for a dead one.
        self._starting: set[str] = set()

    @property
    def user(self) -> SandboxUser:
        """Looked up when first needed: first boot creates the user, possibly after the daemon started."""
        if self._user is None:
            self._user = SandboxUser.lookup(self.user_name)
        return self._user

    @property
    def root(self) -> Path:
        return runs_root(self.config.execution.working_dir)

    def start(self, *, prompt: str, agent: str | None, agent_cmd: str | None, no_bedrock: bool | None) -> RunDir:
        """Create the run dir and its tmux session; returns once the session exists (the run is `queued`)."""
        agent = agent or ("custom" if agent_cmd else self.config.execution.default_agent)
        if agent not in AGENT_NAMES:
            raise RunRequestError(f"agent {agent!r} is not one of {', '.join(AGENT_NAMES)}")
        if (agent == "custom") != bool(agent_cmd):
            raise RunRequestError("--agent-cmd goes with the custom agent, and the custom agent needs --agent-cmd")
        if not prompt.strip():
            raise RunRequestError("the prompt is empty: pass --prompt TEXT or --prompt @FILE")
        user = self.user
        working_dir = self.config.execution.working_dir
        make_owned_dirs(Path(working_dir), Path(RUNS_SUBDIR), user.uid, user.gid)
        run = self._new_run_dir(user)
        run_id = run.run_id
        write_owned_file(run.path, PROMPT, prompt.encode(), user.uid, user.gid, mode=0o640)
        use_no_bedrock = self.config.execution.no_bedrock_default if no_bedrock is None else no_bedrock
        env = agent_environment(
            self.config,
            self.identity,
            user,
            no_bedrock=use_no_bedrock,
            extra={"KM_RUN_ID": run_id, "KM_RUN_DIR": str(run.path)},
        )
        request: dict[str, Any] = {
            "run_id": run_id,
            "sandbox_id": self.identity.sandbox_id,
            "agent": agent,
            "agent_cmd": agent_cmd,
            "extra_args": self.config.execution.agent_args.get(agent, []),
            "env": env,
            "working_dir": working_dir,
            "no_bedrock": use_no_bedrock,
            "created_at": utc_now(),
        }
        write_owned_file(run.path, REQUEST, (json.dumps(request, indent=2) + "\n").encode(), user.uid, user.gid, mode=0o640)
        self._starting.add(run_id)
        try:
            self.sessions.start(run, working_dir, owner_uid=user.uid)
        except Exception as error:
            self._record_failure(run, f"could not start: {error}")
            raise
        finally:
            self._starting.discard(run_id)
        log.info("run started", extra={"fields": {"run_id": run_id, "agent": agent, "no_bedrock": use_no_bedrock}})
        return run

    def _new_run_dir(self, user: SandboxUser) -> RunDir:
        """A run dir that did not exist before: ids from the same millisecond can collide, so retry."""
        for _ in range(10):
            try:
                return RunDir(make_owned_dirs(self.root, Path(new_run_id()), user.uid, user.gid, mode=0o750, exclusive=True))
            except FileExistsError:
                continue
        raise RunRequestError(f"could not make a new run directory in {self.root}")

    def cancel(self, run_id: str | None) -> RunDir:
        """Mark the run cancelled-on-request and close its session; the wrapper records `cancelled`."""
        run = find_run(self.root, run_id)
        if run.status() in TERMINAL:
            return run
        write_owned_file(run.path, CANCEL_REQUESTED, utc_now().encode(), self.user.uid, self.user.gid)
        self.sessions.kill(run.run_id)
        log.info("run cancel requested", extra={"fields": {"run_id": run.run_id}})
        return run

    def reconcile(self) -> list[str]:
        """Record the end of runs whose wrapper is gone without having recorded it; the ids fixed."""
        fixed = []
        for run in all_runs(self.root):
            if run.status() in TERMINAL or run.run_id in self._starting:
                continue
            if self._wrapper_alive(run):
                continue
            if run.status() in TERMINAL:  # it recorded its end and exited while we looked
                continue
            if run.status() == "queued" and self._age_seconds(run) < START_GRACE_SECONDS and run.run_id in self.sessions.alive():
                continue
            cancelled = run.file(CANCEL_REQUESTED).exists()
            reason = (
                "cancelled"
                if cancelled
                else "the run wrapper ended without recording a result (killed, or the sandbox restarted)"
            )
            self._record_failure(run, reason, status="cancelled" if cancelled else "failed")
            fixed.append(run.run_id)
        return fixed

    def _wrapper_alive(self, run: RunDir) -> bool:
        """Whether the run's wrapper process still exists. The pid it recorded is a pid of the agent's own
        PID namespace (host_agent/containment.py), so it is only a first guess here; otherwise the
        wrapper is found by its command line, which names the run directory."""
        marker = str(run.path).encode()
        try:
            pid_text = run.read_text(RUNNER_PID) or ""
        except OSError:
            pid_text = ""
        if pid_text.isdigit() and marker in _command_line(pid_text):
            return True
        return any(marker in _command_line(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())

    @staticmethod
    def _age_seconds(run: RunDir) -> float:
        try:
            return time.time() - run.path.stat().st_mtime
        except OSError:
            return 0.0

    def _record_failure(self, run: RunDir, reason: str, status: str = "failed") -> None:
        """What the wrapper would have written, so `results` has one shape whatever happened."""
        identity = {"run_id": run.run_id, "sandbox_id": self.identity.sandbox_id, "agent": run.request().get("agent")}
        nothing = AgentOutcome(
            is_error=True,
            result=None,
            session_id=None,
            num_turns=None,
            duration_ms=None,
            total_cost_usd=None,
            usage=token_usage(),
            raw=None,
            error=None,
        )
        result = normalised_result(identity, status=status, outcome=nothing, exit_code=None, duration_ms=None, reason=reason)
        user = self.user
        for name, content in (
            (FAILURE_REASON, reason),
            (RESULT, json.dumps(result, indent=2) + "\n"),
            (ENDED_AT, utc_now()),
            (STATUS, status),
        ):
            write_owned_file(run.path, name, content.encode(), user.uid, user.gid)
        log.warning("run ended unrecorded", extra={"fields": {"run_id": run.run_id, "status": status, "reason": reason}})


def _command_line(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
