"""`km init [--dry-run] [--json]`: the account-wide resources ec2 sandboxes need (controller.aws.init)."""

from __future__ import annotations

import sys

import click

from controller.cli.output import print_json


@click.command("init")
@click.option("--dry-run", is_flag=True, help="List the shared resources and whether each exists; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the resources as JSON.")
def init_command(dry_run: bool, as_json: bool) -> None:
    """Create (or bring up to date) the artifacts bucket, DynamoDB tables, teardown handler and its roles."""
    from botocore.exceptions import BotoCoreError, ClientError

    from controller.aws.config import OperatorConfigError, load_operator_config
    from controller.aws.init import initialise, plan

    try:
        config = load_operator_config()
        resources = plan(config) if dry_run else initialise(config, progress=lambda message: click.echo(message, err=True))
    except OperatorConfigError as error:
        click.echo(f"km: {error}", file=sys.stderr)
        sys.exit(1)
    except (BotoCoreError, ClientError) as error:
        click.echo(f"km init: AWS refused: {error}", file=sys.stderr)
        sys.exit(1)
    if as_json:
        print_json([resource.as_json() for resource in resources])
        return
    for resource in resources:
        click.echo(f"{resource.kind:<16} {resource.name:<48} {resource.state}")
