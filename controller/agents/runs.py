"""Agent runs from the operator's side: `km agent run|attach|results|list|cancel`.

Everything goes through the sandbox's own control interface (`km-host-agent …`, entered through the
substrate's channel) and comes back as JSON; the controller never edits a sandbox's files. The one
exception is reading: results the sandbox already uploaded (S3, or the host's artifacts directory on
the local substrate) are read from there first, which is both faster and works when the sandbox is
stopped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from controller.agents import AgentRunError
from controller.sandboxes import Substrate, resolve, resume
from controller.state import SandboxRecord, StateError

Progress = Callable[[str], None]
TERMINAL: Final = frozenset({"complete", "failed", "cancelled"})
KEEPALIVE_SECONDS: Final = 60.0
AGENT_FAILED_EXIT: Final = 1


@dataclass(frozen=True)
class RunOptions:
    prompt: str
    agent: str | None = None  # None: the profile's spec.cli.agent
    agent_cmd: str | None = None
    no_bedrock: bool | None = None  # None: the profile's spec.cli.noBedrock

    def host_agent_args(self) -> list[str]:
        args = ["run"]
        if self.agent_cmd:
            args += ["--agent", "custom", "--agent-cmd", self.agent_cmd]
        elif self.agent:
            args += ["--agent", self.agent]
        if self.no_bedrock is not None:
            args.append("--no-bedrock" if self.no_bedrock else "--bedrock")
        return args


def read_prompt(value: str) -> str:
    """`--prompt TEXT`, or `--prompt @FILE` for a file's content (a path is never guessed from text)."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise AgentRunError(f"--prompt {value}: cannot read {path}: {error.strerror}") from error
    return value


def _ready_sandbox(ref: str, auto_start: bool, progress: Progress) -> tuple[SandboxRecord, Substrate]:
    record, substrate = resolve(ref)
    status = substrate.observe(record)
    if status != "running":
        if not auto_start:
            raise AgentRunError(
                f"{record.alias} ({record.sandbox_id}) is {status}; `km resume {record.alias}` first, or pass --auto-start"
            )
        progress(f"{record.alias} is {status}; resuming it (--auto-start)")
        record = resume(record.sandbox_id, progress=progress)
    return record, substrate


def _call(substrate: Substrate, record: SandboxRecord, args: list[str], input_text: str | None = None) -> tuple[Any, int]:
    """Run `km-host-agent ARGS` in the sandbox; its JSON and exit code (0, or 1 for a failed run)."""
    completed = substrate.host_agent_command(record, args, input_text=input_text)
    if completed.returncode not in (0, AGENT_FAILED_EXIT):
        detail = completed.stderr.strip().removeprefix("km-host-agent: ") or f"exit code {completed.returncode}"
        raise AgentRunError(f"{record.alias}: km-host-agent {args[0]}: {detail}")
    try:
        return json.loads(completed.stdout), completed.returncode
    except ValueError:
        said = repr(completed.stdout.strip()[:200]) if completed.stdout.strip() else "nothing"
        raise AgentRunError(
            f"{record.alias}: km-host-agent {args[0]} answered {said} (exit code {completed.returncode}), not JSON; "
            f"is its host agent installed and running? `km status {record.alias}`"
        ) from None


@contextmanager
def _keep_alive(substrate: Substrate, record: SandboxRecord) -> Iterator[None]:
    """Mark the sandbox active while an operator waits on it, so the idle timeout never fires mid-wait."""
    stop = threading.Event()

    def touch() -> None:
        while True:
            try:
                current = substrate.store.get(record.sandbox_id)
            except StateError:  # destroyed while we waited: nothing to keep alive
                return
            substrate.store.update(
                record.sandbox_id, resources={**current.resources, "last_active": datetime.now(UTC).isoformat()}
            )
            if stop.wait(KEEPALIVE_SECONDS):
                return

    thread = threading.Thread(target=touch, name="keepalive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def start_run(ref: str, options: RunOptions, *, auto_start: bool = False, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Fire and forget: the run id and its tmux session, as soon as the session exists."""
    record, substrate = _ready_sandbox(ref, auto_start, progress)
    started, _ = _call(substrate, record, options.host_agent_args(), input_text=options.prompt)
    return {"sandbox_id": record.sandbox_id, "alias": record.alias, **started}


def run_and_wait(
    ref: str, options: RunOptions, *, auto_start: bool = False, progress: Progress = lambda _: None
) -> tuple[dict[str, Any], int]:
    """Start a run and block until it ends: (normalised result, 0 on success else 1). One round trip."""
    record, substrate = _ready_sandbox(ref, auto_start, progress)
    with _keep_alive(substrate, record):
        result, code = _call(substrate, record, [*options.host_agent_args(), "--wait"], input_text=options.prompt)
    return result, code


def attach(ref: str, run_id: str | None = None) -> int:
    """Put the operator's terminal on the run's tmux session (latest active run by default); Ctrl-B d detaches."""
    record, substrate = resolve(ref)
    if run_id is None:
        runs, _ = _call(substrate, record, ["list"])
        active = [run for run in runs if run["status"] not in TERMINAL]
        if not active:
            raise AgentRunError(f"{record.alias}: no agent run is active; `km agent list {record.alias}` shows past ones")
        run_id = str(active[-1]["run_id"])
    else:
        summary, _ = _call(substrate, record, ["status", "--run", run_id])
        run_id = str(summary["run_id"])
        if summary["status"] in TERMINAL:
            raise AgentRunError(f"run {run_id} has ended ({summary['status']}); `km agent results {record.alias} --run {run_id}`")
    return substrate.attach_run_session(record, f"km-agent-{run_id}")


def run_interactive(
    ref: str, options: RunOptions, *, auto_start: bool = False, progress: Progress = lambda _: None
) -> dict[str, Any]:
    """Start a run and attach to it at once; the run goes on after the operator detaches.

    Returns the run's summary as it stands when the terminal comes back (ended, or still running).
    """
    started = start_run(ref, options, auto_start=auto_start, progress=progress)
    record, substrate = resolve(started["sandbox_id"])
    substrate.attach_run_session(record, str(started["session"]))
    summary, _ = _call(substrate, record, ["status", "--run", str(started["run_id"])])
    return dict(summary)


def results(ref: str, run_id: str | None = None) -> dict[str, Any]:
    """The run's normalised result: the uploaded copy when there is one, else the sandbox's own."""
    record, substrate = resolve(ref)
    uploaded = _uploaded_result(substrate.agent_runs_dir(record), run_id)
    if uploaded is not None:
        return uploaded
    args = ["results"] + (["--run", run_id] if run_id else [])
    result, _ = _call(substrate, record, args)
    return dict(result)


def _uploaded_result(runs_dir: Path | None, run_id: str | None) -> dict[str, Any] | None:
    """A terminal result from the artifacts store, only when it is certainly the one asked for."""
    if runs_dir is None or not runs_dir.is_dir():
        return None
    names = sorted(entry.name for entry in runs_dir.iterdir() if entry.is_dir())
    if run_id is not None:
        names = [name for name in names if name.startswith(run_id)]
        if len(names) != 1:
            return None
    if not names:
        return None
    run = runs_dir / names[-1]
    try:
        status = (run / "status").read_text().strip()
        if status not in TERMINAL:
            return None
        return dict(json.loads((run / "result.json").read_text()))
    except (OSError, ValueError):
        return None


def list_runs(ref: str) -> list[dict[str, Any]]:
    record, substrate = resolve(ref)
    runs, _ = _call(substrate, record, ["list"])
    return list(runs)


def cancel(ref: str, run_id: str | None = None) -> dict[str, Any]:
    record, substrate = resolve(ref)
    summary, _ = _call(substrate, record, ["cancel"] + (["--run", run_id] if run_id else []))
    return dict(summary)
