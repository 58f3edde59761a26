"""`km agent run|attach|results|list|cancel`: thin wrappers over controller.agents.runs."""

from __future__ import annotations

import sys

import click

from controller.cli.output import print_json
from controller.cli.sandbox_commands import operator_errors


def _progress(message: str) -> None:
    click.echo(message, file=sys.stderr)


@click.group("agent")
def agent_group() -> None:
    """Run AI agents in a sandbox and read their results."""


@agent_group.command("run")
@click.argument("ref")
@click.option("--prompt", required=True, help="The prompt text, or @FILE to read it from a file.")
@click.option("--wait", is_flag=True, help="Block until the run ends and print its result (exit 1 if the agent failed).")
@click.option("--interactive", is_flag=True, help="Attach this terminal to the run's tmux session (Ctrl-B d detaches).")
@click.option("--claude", "agent", flag_value="claude", help="Claude Code (the usual default).")
@click.option("--codex", "agent", flag_value="codex", help="OpenAI Codex CLI.")
@click.option("--goose", "agent", flag_value="goose", help="Block's goose.")
@click.option("--agent-cmd", help="Any other CLI, run with bash -c; the prompt arrives on its stdin.")
@click.option(
    "--no-bedrock/--bedrock",
    "no_bedrock",
    default=None,
    help="Drop (or keep) the Bedrock settings (default: the profile's cli.noBedrock).",
)
@click.option("--auto-start", is_flag=True, help="Resume a stopped or paused sandbox first.")
@click.option("--json", "as_json", is_flag=True, help="Print the started run as JSON (--wait always prints JSON).")
@operator_errors
def run_command(
    ref: str,
    prompt: str,
    wait: bool,
    interactive: bool,
    agent: str | None,
    agent_cmd: str | None,
    no_bedrock: bool | None,
    auto_start: bool,
    as_json: bool,
) -> None:
    """Start an agent run in sandbox REF (id, alias or list number); fire-and-forget unless --wait."""
    from controller.agents import runs

    if wait and interactive:
        raise click.UsageError("--wait and --interactive do not go together: --interactive shows the run as it goes")
    if agent and agent_cmd:
        raise click.UsageError(f"--{agent} and --agent-cmd name two agents; choose one")
    options = runs.RunOptions(runs.read_prompt(prompt), agent=agent, agent_cmd=agent_cmd, no_bedrock=no_bedrock)
    if wait:
        result, code = runs.run_and_wait(ref, options, auto_start=auto_start, progress=_progress)
        print_json(result)
        sys.exit(code)
    if interactive:
        summary = runs.run_interactive(ref, options, auto_start=auto_start, progress=_progress)
        run_id = summary["run_id"]
        if summary["status"] in runs.TERMINAL:
            click.echo(f"run {run_id} {summary['status']}; `km agent results {ref} --run {run_id}` prints its result", err=True)
        else:
            click.echo(f"detached from run {run_id}; it goes on. `km agent results {ref} --run {run_id}` when it ends", err=True)
        return
    started = runs.start_run(ref, options, auto_start=auto_start, progress=_progress)
    if as_json:
        print_json(started)
    else:
        click.echo(started["run_id"])
        click.echo(
            f"started in {started['alias']}: `km agent attach {ref}` to watch, `km agent results {ref}` for the result", err=True
        )


@agent_group.command("attach")
@click.argument("ref")
@click.option("--run", "run_id", help="Run id (default: the latest active run).")
@operator_errors
def attach_command(ref: str, run_id: str | None) -> None:
    """Attach this terminal to a run's tmux session; Ctrl-B d detaches and the run goes on."""
    from controller.agents import runs

    sys.exit(runs.attach(ref, run_id))


@agent_group.command("results")
@click.argument("ref")
@click.option("--run", "run_id", help="Run id or unique prefix (default: the latest run).")
@operator_errors
def results_command(ref: str, run_id: str | None) -> None:
    """Print a run's normalised result JSON (`| jq .result`, `| jq .total_cost_usd`)."""
    from controller.agents import runs

    print_json(runs.results(ref, run_id))


@agent_group.command("list")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@operator_errors
def list_command(ref: str, as_json: bool) -> None:
    """The sandbox's agent runs, oldest first."""
    from controller.agents import runs

    listed = runs.list_runs(ref)
    if as_json:
        print_json(listed)
        return
    click.echo(f"{'RUN ID':<24} {'STATUS':<10} {'AGENT':<7} {'STARTED':<20} {'DURATION':>9} {'COST':>8} {'SIZE':>9}")
    for run in listed:
        started = (run.get("started_at") or run.get("created_at") or "-")[:19].replace("T", " ")
        duration = f"{run['duration_ms'] / 1000:.1f}s" if run.get("duration_ms") is not None else "-"
        cost = f"${run['total_cost_usd']:.4f}" if run.get("total_cost_usd") is not None else "-"
        click.echo(
            f"{run['run_id']:<24} {run['status']:<10} {run.get('agent') or '-':<7} {started:<20} {duration:>9} {cost:>8} "
            f"{_size(run.get('size_bytes') or 0):>9}"
        )


@agent_group.command("cancel")
@click.argument("ref")
@click.option("--run", "run_id", help="Run id (default: the latest run).")
@operator_errors
def cancel_command(ref: str, run_id: str | None) -> None:
    """Cancel a run: its agent gets SIGTERM (then SIGKILL) and the run is recorded `cancelled`."""
    from controller.agents import runs

    print_json(runs.cancel(ref, run_id))


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
