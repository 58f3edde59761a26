"""What containment costs at the door: `km shell -- true` as the sandbox user (an agent unit: its
bounding set, mount namespace with the read-only and hidden paths, the read-only bus, a PID namespace
and the socket filter) against `km shell --root -- true` (the operator's unit, none of that).

Run as root after a bake:

    .venv/bin/python benchmarks/agent_shell.py [--runs 15] [--json]

Prints p50s and their ratio; asserts nothing (machines here are shared and noisy). Uses a private state
and sandbox directory, so it never touches an operator's sandboxes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: shellbench, prefix: sb}
spec:
  lifecycle: {ttl: "1h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
  execution: {shell: /bin/bash, workingDir: /workspace, privileged: true}
  network: {egress: {allowedDNSSuffixes: []}}
"""


def km(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "km"), *args], capture_output=True, text=True, check=True)


def seconds(*args: str) -> float:
    started = time.perf_counter()
    km(*args)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="km-shell-bench-") as scratch:
        os.environ["KM_STATE_DIR"] = f"{scratch}/state"
        os.environ["KM_SANDBOX_DIR"] = f"{scratch}/sandboxes"
        profile = Path(scratch, "shellbench.yaml")
        profile.write_text(PROFILE)
        km("create", str(profile))
        try:
            seconds("shell", "shellbench", "--", "true")  # warm caches once
            agent = [seconds("shell", "shellbench", "--", "true") for _ in range(options.runs)]
            operator = [seconds("shell", "shellbench", "--root", "--", "true") for _ in range(options.runs)]
            sudo = [seconds("shell", "shellbench", "--", "sudo", "-n", "true") for _ in range(options.runs)]
        finally:
            km("destroy", "shellbench", "--yes")
    results = {
        "agent_shell_p50_s": round(statistics.median(agent), 3),
        "operator_shell_p50_s": round(statistics.median(operator), 3),
        "agent_shell_with_sudo_p50_s": round(statistics.median(sudo), 3),
    }
    results["agent_over_operator_ratio"] = round(results["agent_shell_p50_s"] / results["operator_shell_p50_s"], 2)
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:30} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
