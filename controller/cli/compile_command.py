"""`km compile`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from controller.cli.output import print_json, report_findings
from controller.compiler import compile_reference
from controller.profile import ProfileError


@click.command("compile")
@click.argument("profile", metavar="FILE_OR_NAME")
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), help="Output directory (default: build/<name>)."
)
@click.option(
    "--ami-block-device",
    "ami_devices",
    multiple=True,
    metavar="DEVICE",
    help="A device the image already maps (repeatable); the extra volume avoids it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def compile_command(profile: str, out_dir: Path | None, ami_devices: tuple[str, ...], as_json: bool) -> None:
    """Compile a profile into plan.json, userdata.sh, iam-policy.json and host-agent.json."""
    try:
        result = compile_reference(profile, out_dir, ami_devices)
    except ProfileError as error:
        report_findings(error.findings)
        sys.exit(1)
    if as_json:
        print_json(
            {
                "profile": result.name,
                "directory": str(result.directory),
                "hash": result.hash,
                "changed": [str(p) for p in result.changed],
            }
        )
        return
    state = f"{len(result.changed)} file(s) written" if result.changed else "up to date"
    click.echo(f"{result.name}: {result.directory} ({state}; plan {result.hash[:12]})")
