"""Writing run files the way the run wrapper does, waiting for things other threads do, and a moto S3 server."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SANDBOX_ID = "sb-0123"
BUCKET = "km-artifacts"


def write_atomically(run_dir: Path, name: str, content: bytes) -> Path:
    """As the run wrapper does: `.<name>.tmp`, then rename."""
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / f".{name}.tmp"
    temporary.write_bytes(content)
    os.replace(temporary, run_dir / name)
    return run_dir / name


def write_run(runs_root: Path, run_id: str, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        write_atomically(runs_root / run_id, name, content)


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


FINISHED_RUN = {
    "prompt": b"fix the flaky test\n",
    "request.json": b'{"agent": "claude"}\n',
    "started_at": b"2025-01-01T00:00:00Z\n",
    "output.jsonl": b'{"type": "message"}\n{"type": "result"}\n',
    "stderr.log": b"",
    "exit_code": b"0\n",
    "ended_at": b"2025-01-01T00:05:00Z\n",
    "result.json": b'{"status": "succeeded", "cost_usd": 0.12}\n',
    "status": b"succeeded\n",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/moto-api/")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


class MotoServer:
    """moto's own server entry point; in-memory, so a restart comes back empty."""

    def __init__(self, port: int, log_file: Path) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log
            )
        wait_until(lambda: _answers(self.port) or self._process is None or self._process.poll() is not None, 20, "moto")
        assert self._process.poll() is None, self._log_file.read_text()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self) -> None:
        self.s3().create_bucket(Bucket=BUCKET)

    def read(self, key: str) -> bytes:
        return bytes(self.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def keys(self) -> list[str]:
        listing = self.s3().list_objects_v2(Bucket=BUCKET)
        return sorted(entry["Key"] for entry in listing.get("Contents", []))
