"""The daemon sees a short public surface, and importing it costs no boto3 import (that waits for an S3 target)."""

from __future__ import annotations

import subprocess
import sys

import host_agent.outbox
from tests.conftest import REPO_ROOT


def test_public_surface() -> None:
    assert host_agent.outbox.__all__ == [
        "ArtifactsUriError",
        "DirectoryTarget",
        "Outbox",
        "S3Target",
        "UploadTarget",
        "target_for",
    ]


def test_importing_the_outbox_loads_neither_boto3_nor_the_controller() -> None:
    code = "import sys, host_agent.outbox; print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'controller')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "[]"
