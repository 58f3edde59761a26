"""How the CLI reports: findings as one line each on stderr, data as JSON on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

import click

from controller.profile import Finding


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def report_findings(findings: Iterable[Finding]) -> None:
    for finding in findings:
        click.echo(str(finding), file=sys.stderr)
