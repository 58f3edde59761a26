"""km and doit as the operator runs them: subprocesses of this installation, in the test's environment
(which points AWS at moto), from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

KM = Path(sys.executable).parent / "km"
DOIT = Path(sys.executable).parent / "doit"


def km(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """`km ARGS`, asserting its exit code (0 unless `expect` says otherwise) and showing its output if not."""
    done = subprocess.run([KM, *args], capture_output=True, text=True, env=os.environ.copy(), cwd=REPO_ROOT, timeout=300)
    assert done.returncode == expect, f"km {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done
