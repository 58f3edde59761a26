"""ec2 control-plane benchmark against a moto server on loopback: API calls and seconds per create, and
the no-op convergent create (issue 7's goal: ≤ 0.5 s and ≤ 5 read calls).

    .venv/bin/python benchmarks/ec2_control_plane.py [--runs 3] [--json]

Runs in-process (`controller.sandboxes.converge`, what `km create` and `doit create:goose` call), so the
numbers are the control plane only: no interpreter start-up, and moto answers in milliseconds where AWS
takes tens to hundreds (the call counts are what carries over). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REGION = "us-east-1"
READS = ("Describe", "Get", "List", "Head")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def counting() -> tuple[Counter[str], Any]:
    from controller.aws import clients

    seen: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        seen[f"{model.service_model.service_name}.{model.name}"] += 1

    clients._session(REGION).events.register("before-call", count)
    return seen, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    scratch = Path(tempfile.mkdtemp(prefix="km-ec2-bench-"))
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(scratch / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(scratch / "none"),
        KM_CONFIG=str(scratch / "config.yaml"),
        KM_STATE_DIR=str(scratch / "state"),
    )
    (scratch / "config.yaml").write_text("{}\n")
    try:
        from controller.aws.config import load_operator_config
        from controller.aws.init import initialise
        from controller.sandboxes import converge, resolve

        initialise(load_operator_config())
        create_s: list[float] = []
        noop_s: list[float] = []
        create_calls: Counter[str] = Counter()
        noop_calls: Counter[str] = Counter()
        for _ in range(args.runs):
            seen, _hook = counting()
            started = time.perf_counter()
            converge("goose")
            create_s.append(time.perf_counter() - started)
            create_calls, before = Counter(seen), Counter(seen)
            started = time.perf_counter()
            result = converge("goose")
            noop_s.append(time.perf_counter() - started)
            noop_calls = Counter(seen) - before
            assert result.convergence.action == "none", result.convergence
            record, substrate = resolve("goose")
            substrate.destroy(record)
        numbers: dict[str, Any] = {
            "create_p50_s": statistics.median(create_s),
            "create_api_calls": sum(create_calls.values()),
            "create_read_calls": sum(n for name, n in create_calls.items() if name.split(".", 1)[1].startswith(READS)),
            "noop_create_p50_s": statistics.median(noop_s),
            "noop_create_api_calls": sum(noop_calls.values()),
            "noop_calls": dict(noop_calls),
        }
    finally:
        server.stop()
    if args.json:
        print(json.dumps(numbers, indent=2))
    else:
        for name, value in numbers.items():
            print(f"{name:<24} {value if isinstance(value, dict) else round(value, 3)}")
        print(
            f"noop goal: ≤ 0.5 s ({numbers['noop_create_p50_s'] / 0.5:.2f}×) and ≤ 5 reads ({numbers['noop_create_api_calls']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
