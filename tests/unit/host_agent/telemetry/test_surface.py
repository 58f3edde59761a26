"""The daemon sees a short public surface, and importing it costs neither the controller nor boto3."""

from __future__ import annotations

import subprocess
import sys

import host_agent.telemetry
from tests.conftest import REPO_ROOT


def test_public_surface() -> None:
    assert set(host_agent.telemetry.__all__) == {
        "ExportCounts",
        "OtlpDecodeError",
        "OtlpReceiver",
        "OtlpRequest",
        "ReceiverStats",
        "Signal",
        "Spool",
        "SpoolError",
        "SpoolLogExporter",
        "SpoolMetricExporter",
        "SpoolSpanExporter",
        "SpoolStats",
        "SIGNALS",
        "Telemetry",
        "TelemetryError",
        "request_from_json",
        "request_to_json",
        "sandbox_attributes",
        "sandbox_resource",
    }
    for name in host_agent.telemetry.__all__:  # each one resolves, on first use
        assert getattr(host_agent.telemetry, name) is not None


def test_the_package_and_the_event_buffer_load_no_sdk() -> None:
    """The daemon reports ready before the SDK (a third of a second of imports) is loaded."""
    code = (
        "import sys, host_agent.telemetry, host_agent.telemetry.buffered; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('opentelemetry', 'google')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "[]"


def test_importing_telemetry_loads_neither_boto3_nor_the_controller() -> None:
    code = "import sys, host_agent.telemetry; print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'controller')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "[]"
