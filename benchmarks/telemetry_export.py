"""Telemetry exporter overhead: the host agent's CPU per reported event, and at a steady event rate.

Run (no root needed):

    .venv/bin/python benchmarks/telemetry_export.py [--events 20000] [--rate 200] [--seconds 10] [--json]

`SandboxEvents` with the default destination (OTLP/JSON spool files, what the outbox ships) is fed TLS
events shaped like the capture's (peer named through an earlier DNS answer, HTTP fields). The burst
measures process CPU time (every thread: the caller's emit and the SDK's batch export and file writes)
per event; the steady run feeds `--rate` events per second for `--seconds` and reports the share of
one core the daemon spent. Asserts nothing (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from host_agent.telemetry.events import SandboxEvents  # noqa: E402
from host_agent.telemetry.pipeline import Telemetry  # noqa: E402
from host_agent.telemetry.resource import sandbox_resource  # noqa: E402
from host_agent.telemetry.spool import Spool  # noqa: E402

HTTP = {"protocol": "http/1.1", "method": "POST", "path": "/v1/messages", "host": "api.example.test"}


def emit(events: SandboxEvents, count: int) -> None:
    for index in range(count):
        events.tls(
            time=time.time(),
            pid=4242,
            process="python3",
            direction="write" if index % 2 else "read",
            size=512 + index % 1000,
            peer=("192.0.2.7", 443),
            http=HTTP if index % 2 else None,
            payload=None,
        )


def burst(directory: Path, count: int) -> dict[str, float]:
    telemetry = Telemetry(sandbox_resource("sb-bench", "bench", None), spool=Spool(directory / "burst"))
    events = SandboxEvents(telemetry)
    events.dns(name="api.example.test", qtype="A", decision="allowed", rcode="NOERROR", addresses=["192.0.2.7"])
    cpu, wall = time.process_time(), time.perf_counter()
    emit(events, count)
    telemetry.force_flush(60)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    telemetry.shutdown()
    written = sum(path.stat().st_size for path in (directory / "burst").rglob("*.json"))
    return {
        "burst_events": count,
        "burst_cpu_us_per_event": cpu / count * 1e6,
        "burst_events_per_second": count / wall,
        "burst_spool_bytes_per_event": written / count,
    }


def steady(directory: Path, rate: int, seconds: float) -> dict[str, float]:
    telemetry = Telemetry(sandbox_resource("sb-bench", "bench", None), spool=Spool(directory / "steady"))
    events = SandboxEvents(telemetry)
    tick = 0.05
    per_tick = max(1, round(rate * tick))
    cpu, started = time.process_time(), time.perf_counter()
    next_tick = started
    while (now := time.perf_counter()) - started < seconds:
        if now < next_tick:
            time.sleep(next_tick - now)
        emit(events, per_tick)
        next_tick += tick
    telemetry.force_flush(60)
    used, elapsed = time.process_time() - cpu, time.perf_counter() - started
    telemetry.shutdown()
    return {"steady_rate_per_second": rate, "steady_seconds": elapsed, "steady_cpu_percent_of_one_core": used / elapsed * 100}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="km-telemetry-bench-") as scratch:
        numbers = {**burst(Path(scratch), args.events), **steady(Path(scratch), args.rate, args.seconds)}
    if args.json:
        print(json.dumps(numbers, indent=2))
    else:
        for name, value in numbers.items():
            print(f"{name:<36} {value:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
