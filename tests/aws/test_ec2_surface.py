"""The ec2 package's public surface is short, sorted and importable without boto3 (km --help stays fast); the
boot stub's fetch refuses a script that does not match its checksum."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import controller.substrates.ec2 as ec2
from controller.substrates.ec2.userdata import boot_stub, needs_offload
from tests.conftest import REPO_ROOT


def test_the_surface_is_sorted_and_complete() -> None:
    assert ec2.__all__ == sorted(ec2.__all__)
    assert all(hasattr(ec2, name) for name in ec2.__all__)
    assert {"ensure_sandbox", "destroy_all", "CapacityError", "ensure_security_group", "ensure_role", "resolve_ami"} <= set(
        ec2.__all__
    )


def test_importing_it_does_not_import_boto3() -> None:
    code = (
        "import sys, controller.substrates.ec2; print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_the_stub_is_small_and_its_fetch_refuses_a_wrong_checksum(tmp_path: Path) -> None:
    served = tmp_path / "served.sh"
    served.write_text("#!/bin/bash\necho tampered\n")
    stub = boot_stub(served.as_uri(), "0" * 64, str(tmp_path / "userdata.sh"))
    assert not needs_offload(stub)
    fetch = re.search(r"<<'KM_FETCH'.*?\n(.*?)\nKM_FETCH\n", stub, re.DOTALL)
    assert fetch is not None

    result = subprocess.run(
        [sys.executable, "-", str(tmp_path / "userdata.sh")], input=fetch.group(1), capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 1 and "does not match its checksum" in result.stderr
    assert not (tmp_path / "userdata.sh").exists()
