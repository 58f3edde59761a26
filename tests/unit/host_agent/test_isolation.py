"""The sandbox side imports nothing from the operator side (it ships into sandboxes alone)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_no_host_agent_module_imports_controller() -> None:
    offenders = []
    for file in sorted((REPO_ROOT / "host_agent").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{file.relative_to(REPO_ROOT)}: {n}" for n in names if n == "controller" or n.startswith("controller.")
            ]
    assert offenders == []


def test_importing_the_daemon_loads_no_operator_modules() -> None:
    code = "import sys, host_agent.cli, host_agent.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('controller', 'boto3', 'click', 'doit')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path("/"))
    assert result.stdout.strip() == "[]"
