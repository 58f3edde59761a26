"""A sandbox's telemetry by reference: find its directory, ask a running sandbox to flush, read the files.

Reading works whether or not the sandbox runs: the files are on the host (the local substrate's
artifacts directory). A running sandbox is first asked to write out what it still holds in memory, on a
best-effort basis: if that fails, what is already on disk is still the answer.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from controller.sandboxes import Substrate, resolve
from controller.state import SandboxRecord
from controller.substrates.local.machine import MachineError
from controller.substrates.local.substrate import SubstrateError
from controller.telemetry.events import TelemetryRead, read_telemetry

FLUSH_COMMAND: Final = "flush-telemetry"
FLUSH_TIMEOUT_SECONDS: Final = 15.0


@dataclass(frozen=True)
class SandboxTelemetry:
    """What `read_sandbox_telemetry` found, and where it looked (for the operator's 'nothing yet' line)."""

    directory: Path
    read: TelemetryRead
    flushed: bool


def read_sandbox_telemetry(ref: str) -> SandboxTelemetry:
    """The telemetry of sandbox REF (id, alias or list number), flushed first when it is running."""
    record, substrate = resolve(ref)
    flushed = request_flush(substrate, record)
    directory = substrate.telemetry_dir(record)
    return SandboxTelemetry(directory, read_telemetry(directory), flushed)


def request_flush(substrate: Substrate, record: SandboxRecord) -> bool:
    """Ask the host agent to export what it has buffered (`km-host-agent flush-telemetry`); True if it did.

    Never raises: a stopped sandbox, an older host agent without the command, or a slow one all mean
    reading what is already on disk.
    """
    try:
        completed = substrate.host_agent_command(record, [FLUSH_COMMAND], timeout=FLUSH_TIMEOUT_SECONDS)
    except (SubstrateError, MachineError, OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0
