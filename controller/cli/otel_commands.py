"""`km otel REF`: a sandbox's telemetry as a timeline or JSON; a thin wrapper over controller.telemetry."""

from __future__ import annotations

import sys

import click

from controller.cli.output import print_json
from controller.cli.sandbox_commands import operator_errors


@click.command("otel")
@click.argument("ref")
@click.option("--timeline", is_flag=True, help="One line per event, oldest first, then totals (the default).")
@click.option("--prompts", is_flag=True, help="Only the prompts the agent was given.")
@click.option("--tools", is_flag=True, help="Only tool decisions and results (with --prompts: both).")
@click.option("--json", "as_json", is_flag=True, help="Print the events as a JSON list instead.")
@operator_errors
def otel_command(ref: str, timeline: bool, prompts: bool, tools: bool, as_json: bool) -> None:
    """Show what happened in sandbox REF (id, alias or list number): DNS, gate, TLS, API calls, tools, runs."""
    from controller.telemetry import read_sandbox_telemetry, render_timeline, select_events

    if timeline and as_json:
        raise click.UsageError("--timeline and --json are two ways to print; choose one")
    found = read_sandbox_telemetry(ref)
    unreadable = found.read.unreadable
    if unreadable:
        files = "file" if len(unreadable) == 1 else "files"
        click.echo(f"km: {len(unreadable)} unreadable telemetry {files} skipped (first: {unreadable[0].path})", err=True)
    everything = found.read.events
    shown = select_events(everything, prompts=prompts, tools=tools)
    if not everything:
        click.echo(f"no telemetry for {ref} yet (looked in {found.directory})", file=sys.stderr)
    if as_json:
        print_json([event.as_json() for event in shown])
    elif everything:
        for line in render_timeline(shown, everything):
            click.echo(line)
