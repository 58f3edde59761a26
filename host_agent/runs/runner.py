"""The run wrapper: what a run's tmux pane executes, as the sandbox user, in the agent cgroup.

It starts the agent as the request says, copies its output both to the run dir (the data channel) and
to the pane (so an attached operator watches it live), and records the end itself: exit code, the
normalised `result.json`, then `status`. Because the wrapper, not the daemon, records the end, a run
goes on and is recorded while the daemon restarts. Stdlib only: it starts once per run.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from host_agent.agents import AgentOutcome, adapter_for
from host_agent.runs.layout import (
    CANCEL_REQUESTED,
    ENDED_AT,
    EXIT_CODE,
    FAILURE_REASON,
    PROMPT,
    RESULT,
    RUNNER_PID,
    STARTED_AT,
    STATUS,
    STDERR,
    RunDir,
    utc_now,
)

STDERR_TAIL_BYTES = 4096
TERMINATE_GRACE_SECONDS = 5.0


class _Interrupted(Exception):
    """The pane was closed (SIGHUP) or the wrapper was told to stop (SIGTERM/SIGINT)."""


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def run(run_dir: RunDir) -> int:
    request = run_dir.request()
    # One adapter for both ends of the run: it may remember what the invocation chose (codex's model).
    adapter = adapter_for(request["agent"])
    invocation = adapter.invocation(run_dir.file(PROMPT), request["extra_args"], request.get("agent_cmd"))
    output_path = run_dir.file(invocation.output_name)
    run_dir.write(RUNNER_PID, str(os.getpid()))
    run_dir.write(STARTED_AT, utc_now())
    run_dir.write(STATUS, "running")
    started = time.monotonic()
    exit_code: int | None = None
    reason: str | None = None
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    process: subprocess.Popen[bytes] | None = None
    try:
        with (
            open(run_dir.file(PROMPT), "rb") as prompt,
            output_path.open("wb") as output,
            run_dir.file(STDERR).open("wb") as errors,
        ):
            try:
                process = subprocess.Popen(
                    invocation.argv,
                    cwd=request["working_dir"],
                    env={**request["env"], **invocation.env},
                    stdin=prompt if invocation.prompt_on_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # its own process group: cancel stops the agent's children too
                )
            except OSError as error:
                exit_code, reason = 127, f"could not start {invocation.argv[0]}: {error.strerror}"
                errors.write(f"km: {reason}\n".encode())
            else:
                _pump(process, output, errors)
                exit_code = process.wait()
    except _Interrupted as interrupted:
        reason = f"interrupted by {interrupted}"
        if process is not None:
            exit_code = _terminate(process)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # recording the end must not be interrupted half-way
    duration_ms = int((time.monotonic() - started) * 1000)
    stdout = output_path.read_bytes() if output_path.exists() else b""
    outcome = adapter.outcome(stdout, exit_code if exit_code is not None else -1, _stderr_tail(run_dir))
    _record_end(run_dir, request, outcome, exit_code=exit_code, reason=reason, duration_ms=duration_ms)
    return 0


def _pump(process: subprocess.Popen[bytes], output: IO[bytes], errors: IO[bytes]) -> None:
    """Copy the agent's stdout and stderr to their files and to the pane until both close."""
    assert process.stdout is not None and process.stderr is not None
    pane = sys.stdout.buffer
    targets = {process.stdout.fileno(): output, process.stderr.fileno(): errors}
    with selectors.DefaultSelector() as selector:
        for descriptor in targets:
            selector.register(descriptor, selectors.EVENT_READ)
        while targets:
            for key, _ in selector.select():
                chunk = os.read(int(key.fd), 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    del targets[int(key.fd)]
                    continue
                targets[int(key.fd)].write(chunk)
                try:
                    pane.write(chunk)
                    pane.flush()
                except OSError:
                    pass  # the pane went away; the files are what matter


def _terminate(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the agent's whole process group, SIGKILL it if it lingers; its exit code."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for signum, grace in ((signal.SIGTERM, TERMINATE_GRACE_SECONDS), (signal.SIGKILL, TERMINATE_GRACE_SECONDS)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return -9


def _stderr_tail(run_dir: RunDir) -> str:
    with run_dir.file(STDERR).open("rb") as stream:
        stream.seek(0, os.SEEK_END)
        stream.seek(max(0, stream.tell() - STDERR_TAIL_BYTES))
        return stream.read().decode("utf-8", errors="replace")


def _record_end(
    run_dir: RunDir,
    request: dict[str, Any],
    outcome: AgentOutcome,
    *,
    exit_code: int | None,
    reason: str | None,
    duration_ms: int,
) -> None:
    """exit_code, result.json, ended_at, then status: a terminal status means everything else is there."""
    cancelled = run_dir.file(CANCEL_REQUESTED).exists()
    if cancelled:
        status = "cancelled"
    elif reason is not None or outcome.is_error or exit_code != 0:
        status = "failed"
    else:
        status = "complete"
    result = normalised_result(
        request, status=status, outcome=outcome, exit_code=exit_code, duration_ms=duration_ms, reason=reason
    )
    if exit_code is not None:
        run_dir.write(EXIT_CODE, str(exit_code))
    if status == "failed":
        run_dir.write(FAILURE_REASON, result["error"] or f"exit code {exit_code}")
    run_dir.write(RESULT, json.dumps(result, indent=2) + "\n")
    run_dir.write(ENDED_AT, utc_now())
    run_dir.write(STATUS, status)


def normalised_result(
    request: dict[str, Any],
    *,
    status: str,
    outcome: AgentOutcome,
    exit_code: int | None,
    duration_ms: int | None,
    reason: str | None,
) -> dict[str, Any]:
    """One shape for every agent; the agent's own duration wins over our wall clock when it reports one."""
    error = reason or outcome.error
    if error is None and status == "failed":
        error = f"{request['agent']} exited with {exit_code}"
    return {
        "run_id": request["run_id"],
        "sandbox_id": request["sandbox_id"],
        "agent": request["agent"],
        "status": status,
        "result": outcome.result,
        "is_error": status != "complete",
        "error": error,
        "exit_code": exit_code,
        "session_id": outcome.session_id,
        "num_turns": outcome.num_turns,
        "duration_ms": outcome.duration_ms if outcome.duration_ms is not None else duration_ms,
        "total_cost_usd": outcome.total_cost_usd,
        "usage": outcome.usage,
        "raw": outcome.raw,
    }


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m host_agent.runs.runner RUN_DIR", file=sys.stderr)
        return 2
    return run(RunDir(Path(arguments[0])))


if __name__ == "__main__":
    sys.exit(main())
