"""`km validate` and `km profile …`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from controller.cli.output import print_json, report_findings
from controller.profile import ProfileError, ProfileResolver, load_profile, validate
from controller.profile.catalog import builtin_profiles
from controller.profile.errors import display_path
from controller.profile.reference import profile_reference, replace_reference_section


@click.command("validate")
@click.argument("profiles", nargs=-1, required=True, metavar="FILE_OR_NAME...")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
def validate_command(profiles: tuple[str, ...], as_json: bool) -> None:
    """Check profiles (with everything they extend); exit 1 if any is invalid."""
    resolver = ProfileResolver()
    reports = [validate(reference, resolver) for reference in profiles]
    if as_json:
        print_json([report.as_json() for report in reports])
    else:
        for report in reports:
            shown = display_path(report.file) if report.file else report.reference
            report_findings(report.findings)
            if report.valid:
                kind = " (abstract fragment: checked for structure; rules apply where it is extended)" if report.abstract else ""
                warned = " (with warnings)" if report.warnings else ""
                click.echo(f"{shown}: valid{warned}{kind}")
            else:
                click.echo(f"{shown}: invalid ({len(report.errors)} error{'s' if len(report.errors) != 1 else ''})")
    sys.exit(0 if all(report.valid for report in reports) else 1)


@click.group("profile")
def profile_group() -> None:
    """Inspect profiles."""


@profile_group.command("show")
@click.argument("profile", metavar="FILE_OR_NAME")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def show_command(profile: str, as_json: bool) -> None:
    """Print the fully merged profile, with every default filled in."""
    try:
        loaded, _ = load_profile(profile)
    except ProfileError as error:
        report_findings(error.findings)
        sys.exit(1)
    data = loaded.dump()
    if as_json:
        print_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)


@profile_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(as_json: bool) -> None:
    """List the built-in profiles and fragments."""
    entries = builtin_profiles()
    if as_json:
        print_json([{"name": e.name, "file": str(e.file), "abstract": e.abstract} for e in entries])
        return
    for entry in entries:
        click.echo(f"{entry.name}{'  (fragment)' if entry.abstract else ''}")


@profile_group.command("reference")
@click.option(
    "--update",
    "target",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Rewrite the reference section of this Markdown file in place.",
)
def reference_command(target: Path | None) -> None:
    """Print the profile field reference (generated from the schema)."""
    if target is None:
        click.echo(profile_reference(), nl=False)
        return
    target.write_text(replace_reference_section(target.read_text(encoding="utf-8")), encoding="utf-8")
    click.echo(f"{target}: profile reference updated")
