"""`km-host-agent`: the daemon, and the control interface the operator side calls inside the sandbox.

Every control command prints JSON on stdout (the operator side parses it; it never reads the sandbox's
files itself) and errors as one line on stderr. Starting and cancelling runs goes through the daemon's
control socket; reading runs (`status`, `results`, `list`) reads the run dirs directly, so it works even
while the daemon restarts. Heavy imports stay inside the commands that need them: these commands sit on
the dispatch path, where interpreter start-up is most of the cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from host_agent.paths import (
    CONFIG_PATH,
    CONTROL_SOCKET,
    OTLP_RECEIVER_PORT,
    SANDBOX_ENV_PATH,
    STATE_DIR,
    TELEMETRY_ENV_PATH,
    TMUX_SOCKET,
)
from host_agent.version import __version__

EXIT_FAILED = 1
EXIT_USAGE = 2
WAIT_POLL_SECONDS = (0.005, 0.25)  # first and largest pause between status reads


class CommandError(Exception):
    """A control command that cannot be done; printed as one line, exit code 1."""


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _runs_root(args: argparse.Namespace) -> Path:
    from host_agent.runs.layout import runs_root_of

    try:
        return runs_root_of(args.config)
    except (OSError, KeyError, ValueError) as error:
        raise CommandError(f"cannot read the working directory from {args.config}: {error}") from error


def _find(args: argparse.Namespace) -> Any:
    from host_agent.runs.layout import find_run

    try:
        return find_run(_runs_root(args), args.run)
    except LookupError as error:
        raise CommandError(str(error.args[0])) from error


def wait_for_end(run: Any, timeout: float | None) -> str:
    """Poll the run's status file until it is terminal; the pause grows so long runs cost nothing."""
    from host_agent.runs.layout import TERMINAL

    deadline = None if timeout is None else time.monotonic() + timeout
    pause, longest = WAIT_POLL_SECONDS
    while (status := run.status()) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise CommandError(f"run {run.run_id} is still {status} after {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 1.5, longest)
    return str(status)


def _result_or_summary(run: Any) -> dict[str, Any]:
    from host_agent.runs.layout import TERMINAL

    result = run.result() if run.status() in TERMINAL else None
    if result is not None:
        return dict(result)
    summary = run.summary()
    return {**summary, "result": None, "is_error": summary["status"] in TERMINAL}


def command_run(args: argparse.Namespace) -> int:
    from host_agent.control import ControlError, call
    from host_agent.runs.layout import RunDir

    prompt = sys.stdin.read()
    request = {"op": "run", "prompt": prompt, "agent": args.agent, "agent_cmd": args.agent_cmd, "no_bedrock": args.no_bedrock}
    try:
        started = call(request, args.control_socket)
    except ControlError as error:
        raise CommandError(str(error)) from error
    if not args.wait:
        _print_json({key: started[key] for key in ("run_id", "session", "run_dir")})
        return 0
    run = RunDir(Path(started["run_dir"]))
    status = wait_for_end(run, args.timeout)
    _print_json(_result_or_summary(run))
    return 0 if status == "complete" else EXIT_FAILED


def command_cancel(args: argparse.Namespace) -> int:
    from host_agent.control import ControlError, call
    from host_agent.runs.layout import RunDir

    try:
        response = call({"op": "cancel", "run_id": args.run}, args.control_socket)
    except ControlError as error:
        raise CommandError(str(error)) from error
    run = RunDir(Path(response["run_dir"]))
    wait_for_end(run, args.timeout)
    _print_json(run.summary())
    return 0


def _daemon_query(args: argparse.Namespace, operation: str, timeout: float) -> int:
    from host_agent.control import ControlError, call

    try:
        response = call({"op": operation}, args.control_socket, timeout=timeout)
    except ControlError as error:
        raise CommandError(str(error)) from error
    response.pop("ok", None)
    _print_json(response)
    return 0


def command_health(args: argparse.Namespace) -> int:
    return _daemon_query(args, "health", timeout=5)


def command_flush_telemetry(args: argparse.Namespace) -> int:
    return _daemon_query(args, "flush-telemetry", timeout=30)


def command_status(args: argparse.Namespace) -> int:
    _print_json(_find(args).summary())
    return 0


def command_results(args: argparse.Namespace) -> int:
    run = _find(args)
    if args.wait:
        wait_for_end(run, args.timeout)
    _print_json(_result_or_summary(run))
    return 0


def command_list(args: argparse.Namespace) -> int:
    from host_agent.runs.layout import all_runs

    _print_json([run.summary() for run in all_runs(_runs_root(args))])
    return 0


def command_check_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from host_agent.config import load_config

    try:
        config = load_config(args.config)
    except (OSError, ValidationError) as exc:
        raise CommandError(f"{args.config}: {exc}") from exc
    print(f"{args.config}: valid (profile {config.profile}, enforcement {config.egress.enforcement})")
    return 0


def command_daemon(args: argparse.Namespace) -> int:
    from host_agent.daemon import DaemonPaths, run_daemon

    return run_daemon(
        DaemonPaths(
            config=args.config,
            identity=args.identity,
            control_socket=args.control_socket,
            tmux_socket=args.tmux_socket,
            state_dir=args.state_dir,
            sandbox_user=args.sandbox_user,
            gate_cgroup=args.gate_cgroup,
            telemetry_env=args.telemetry_env,
            otlp_port=args.otlp_port,
        )
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="km-host-agent", description="km sandbox daemon and its control interface")
    parser.add_argument("--version", action="version", version=f"km-host-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=CONFIG_PATH)
    common.add_argument("--control-socket", type=Path, default=CONTROL_SOCKET)
    commands = parser.add_subparsers(dest="command")

    daemon = commands.add_parser("daemon", parents=[common], help="run the daemon (under systemd, Type=notify)")
    daemon.add_argument("--identity", type=Path, default=SANDBOX_ENV_PATH)
    daemon.add_argument("--tmux-socket", type=Path, default=TMUX_SOCKET)
    daemon.add_argument("--state-dir", type=Path, default=STATE_DIR)
    daemon.add_argument("--sandbox-user", default="sandbox", help="who agent runs run as (tests use their own user)")
    daemon.add_argument(
        "--gate-cgroup",
        type=Path,
        help="attach the egress gate to this cgroup v2 dir; `auto`: this machine's cgroup2 root (the unit passes it)",
    )
    daemon.add_argument("--telemetry-env", type=Path, default=TELEMETRY_ENV_PATH, help="the operator's collector, if any")
    daemon.add_argument(
        "--otlp-port", type=int, default=OTLP_RECEIVER_PORT, help="the agents' loopback OTLP/HTTP receiver (0: any free port)"
    )
    daemon.set_defaults(handler=command_daemon)
    check = commands.add_parser("check-config", parents=[common], help="validate host-agent.json and exit")
    check.set_defaults(handler=command_check_config)

    run = commands.add_parser("run", parents=[common], help="start an agent run; the prompt is read from stdin")
    run.add_argument("--agent", choices=["claude", "codex", "goose", "custom"])
    run.add_argument("--agent-cmd", help="any CLI: run with bash -c, the prompt on its stdin")
    bedrock = run.add_mutually_exclusive_group()
    bedrock.add_argument("--no-bedrock", dest="no_bedrock", action="store_true", default=None)
    bedrock.add_argument("--bedrock", dest="no_bedrock", action="store_false")
    run.add_argument("--wait", action="store_true", help="block until the run ends and print its result")
    run.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    run.set_defaults(handler=command_run)

    for name, handler, text in (
        ("status", command_status, "one run's state (latest by default)"),
        ("results", command_results, "one run's normalised result (latest by default)"),
        ("cancel", command_cancel, "cancel a run (latest by default) and wait for it to end"),
    ):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("--run", help="run id (or a unique prefix)")
        sub.add_argument("--timeout", type=float, default=30.0 if name == "cancel" else None)
        if name == "results":
            sub.add_argument("--wait", action="store_true", help="wait for the run to end first")
        sub.set_defaults(handler=handler)
    listing = commands.add_parser("list", parents=[common], help="every run, oldest first")
    listing.set_defaults(handler=command_list)
    health = commands.add_parser("health", parents=[common], help="the daemon's own state")
    health.set_defaults(handler=command_health)
    flush = commands.add_parser("flush-telemetry", parents=[common], help="export and upload telemetry recorded so far")
    flush.set_defaults(handler=command_flush_telemetry)
    socket_filter = commands.add_parser(
        "socket-filter", help="install the agent's socket filter, then run COMMAND (agent units start through it)"
    )
    socket_filter.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS…]")
    socket_filter.set_defaults(handler=command_socket_filter)
    return parser


def command_socket_filter(args: argparse.Namespace) -> int:
    from host_agent.socket_filter import run

    command = list(args.command)
    return run(command[1:] if command[:1] == ["--"] else command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        print(f"km-host-agent {__version__}")
        return 0
    from host_agent.runs.layout import RunFileError

    try:
        return int(args.handler(args))
    except (CommandError, RunFileError) as error:
        print(f"km-host-agent: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
