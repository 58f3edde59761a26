"""`km`: the operator's command line. Each command parses arguments and calls one controller function."""

from __future__ import annotations

import sys

import click

from controller.cli.agent_commands import agent_group
from controller.cli.compile_command import compile_command
from controller.cli.init_command import init_command
from controller.cli.otel_commands import otel_command
from controller.cli.profile_commands import profile_group, validate_command
from controller.cli.sandbox_commands import SANDBOX_COMMANDS, destroy_command, resume_command
from host_agent.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="km")
def cli() -> None:
    """km: policy-enforced sandboxes for AI coding agents, compiled from YAML profiles."""


cli.add_command(validate_command)
cli.add_command(profile_group)
cli.add_command(compile_command)
cli.add_command(agent_group)
cli.add_command(otel_command)
cli.add_command(init_command)
for command in SANDBOX_COMMANDS:
    cli.add_command(command)
cli.add_command(destroy_command, name="kill")
cli.add_command(resume_command, name="start")


def main() -> None:
    sys.exit(cli.main(standalone_mode=True))
