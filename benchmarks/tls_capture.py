"""TLS capture benchmark: the added cost per SSL call with the uprobes on vs off, and events without loss.

Run as root (uprobes, cgroups):

    .venv/bin/python benchmarks/tls_capture.py [--writes 5000] [--size 100] [--rounds 3] [--json]

A python `ssl` client (tests/gate/tls_client.py) makes `--writes` small SSL writes to a loopback TLS
server, in rounds: without probes, with probes capturing sizes, with the caller outside the target
cgroup (the probe still fires: every libssl user on the machine pays it), and with payload capture.
The per-write medians and their ratio to "off" are printed; so is a burst of large writes, to show how
many events a reader polling in a loop receives and how many a full ring loses (counted, never silent).
Asserts nothing (machines here are shared and noisy). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ebpf.tls_capture import MAX_PAYLOAD_BYTES, TlsCapture  # noqa: E402

HELPERS = REPO / "tests" / "gate"
LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")


def cgroup2_mount() -> Path:
    unified = Path("/sys/fs/cgroup/unified")
    return unified if (unified / "cgroup.procs").exists() else Path("/sys/fs/cgroup")


class Client:
    """tests/gate/tls_client.py in `cgroup` (None: where this process is)."""

    def __init__(self, cgroup: Path | None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPERS / "tls_client.py"), str(cgroup) if cgroup else "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply

    def writes(self, port: int, count: int, size: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": "writes", "port": port, "count": count, "size": size}) + "\n")
        self.process.stdin.flush()
        return float(self.read()["per_write_us"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def server(directory: Path) -> tuple[subprocess.Popen[str], int]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True,
        capture_output=True,
    )
    command = [sys.executable, str(HELPERS / "tls_server.py"), str(cert), str(key)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline().split()[1])


def drain(capture: TlsCapture, stop: threading.Event, received: list[int]) -> None:
    while not stop.is_set():
        received[0] += len(capture.poll(50))


def measure(args: argparse.Namespace, port: int, cgroup: Path) -> dict[str, float]:
    inside, outside = Client(cgroup), Client(None)
    results: dict[str, list[float]] = {}
    try:
        inside.writes(port, args.writes // 10, args.size)  # warm up
        for _ in range(args.rounds):
            results.setdefault("off_us", []).append(inside.writes(port, args.writes, args.size))
        for payload, name in ((0, "sizes"), (MAX_PAYLOAD_BYTES, "payloads")):
            with TlsCapture(payload) as capture:
                capture.attach_library(LIBSSL)
                capture.add_target(cgroup)
                stop, received = threading.Event(), [0]
                reader = threading.Thread(target=drain, args=(capture, stop, received), daemon=True)
                reader.start()
                for _ in range(args.rounds):
                    results.setdefault(f"on_{name}_us", []).append(inside.writes(port, args.writes, args.size))
                    if payload == 0:
                        results.setdefault("on_caller_outside_us", []).append(outside.writes(port, args.writes, args.size))
                stop.set()
                reader.join()
        with TlsCapture(MAX_PAYLOAD_BYTES) as capture:  # a burst of 4 KiB writes against a polling reader
            capture.attach_library(LIBSSL)
            capture.add_target(cgroup)
            stop, received = threading.Event(), [0]
            reader = threading.Thread(target=drain, args=(capture, stop, received), daemon=True)
            reader.start()
            started = time.perf_counter()
            inside.writes(port, args.burst, MAX_PAYLOAD_BYTES)
            elapsed = time.perf_counter() - started
            time.sleep(0.3)
            stop.set()
            reader.join()
            counters = capture.counters()
    finally:
        inside.stop()
        outside.stop()
    numbers = {name: statistics.median(values) for name, values in results.items()}
    off = numbers["off_us"]
    for name in list(numbers):
        if name != "off_us":
            numbers[name.replace("_us", "_added_us")] = numbers[name] - off
            numbers[name.replace("_us", "_ratio")] = numbers[name] / off
    numbers.update(
        {
            "burst_events_per_s": received[0] / elapsed,
            "burst_received": float(received[0]),
            "burst_lost": float(counters["lost"]),
        }
    )
    return numbers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=5000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=20000, help="4 KiB writes in the loss test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: uprobes and cgroups need it")
    cgroup = cgroup2_mount() / f"km-bench-tls-{os.getpid()}"
    cgroup.mkdir()
    with tempfile.TemporaryDirectory() as directory:
        tls_server, port = server(Path(directory))
        try:
            numbers = measure(args, port, cgroup)
        finally:
            tls_server.kill()
            tls_server.wait()
            (cgroup / "cgroup.kill").write_text("1")
            time.sleep(0.1)
            cgroup.rmdir()
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0
    for name, value in numbers.items():
        print(f"{name:<32} {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
