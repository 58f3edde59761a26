"""Agent run benchmarks: dispatch overhead of `km agent run --wait`, and `km agent results` latency.

Run as root after a bake (`doit bake:debian-12`):

    .venv/bin/python benchmarks/agent_runs.py [--runs 10] [--json]

Dispatch overhead is the wall time of a run whose agent exits at once (`--agent-cmd true`) minus the
agent's own time as the wrapper measured it; it is reported both in-process (the controller function
the CLI calls) and for the `km` command (which adds interpreter start-up). Prints numbers and their
ratio to the issue's goals; asserts nothing (machines here are shared and noisy). Uses a private state
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

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: runbench, prefix: rb}
spec:
  lifecycle: {ttl: "1h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
  execution: {shell: /bin/bash, workingDir: /workspace}
  network: {enforcement: ebpf, egress: {allowedDNSSuffixes: [.example.com]}}
"""
GOALS = {"dispatch_overhead_in_process_p50_s": 0.3, "results_in_process_p50_s": 0.2}


def km(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "km"), *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"km {' '.join(args)} failed: {result.stderr}")
    return result


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the local substrate needs it")
    work = Path(tempfile.mkdtemp(prefix="km-bench-runs-"))
    os.environ["KM_STATE_DIR"] = str(work / "state")
    os.environ["KM_SANDBOX_DIR"] = str(work / "sandboxes")
    profile = work / "runbench.yaml"
    profile.write_text(PROFILE)
    sandbox = json.loads(km("create", str(profile), "--json").stdout)["sandbox"]["id"]

    from controller.agents.runs import RunOptions, results, run_and_wait

    numbers: dict[str, float] = {}
    try:
        quick = RunOptions("benchmark", agent_cmd="true")
        run_and_wait(sandbox, quick)  # warm: km's tmux server starts with the first run
        in_process, agent_own, cli_wall = [], [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            result, _ = run_and_wait(sandbox, quick)
            in_process.append(time.perf_counter() - start)
            agent_own.append(result["duration_ms"] / 1000)
        for _ in range(args.runs):
            start = time.perf_counter()
            km("agent", "run", sandbox, "--agent-cmd", "true", "--prompt", "benchmark", "--wait")
            cli_wall.append(time.perf_counter() - start)
        results_in_process, results_cli, results_from_sandbox = [], [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            results(sandbox)
            results_in_process.append(time.perf_counter() - start)
            start = time.perf_counter()
            km("agent", "results", sandbox)
            results_cli.append(time.perf_counter() - start)
        from controller.sandboxes import resolve

        record, substrate = resolve(sandbox)
        for _ in range(args.runs):
            start = time.perf_counter()
            substrate.host_agent_command(record, ["results"])
            results_from_sandbox.append(time.perf_counter() - start)
        numbers = {
            "dispatch_overhead_in_process_p50_s": p50([total - own for total, own in zip(in_process, agent_own, strict=True)]),
            "run_wait_in_process_p50_s": p50(in_process),
            "agent_own_p50_s": p50(agent_own),
            "km_agent_run_wait_wall_p50_s": p50(cli_wall),
            "results_in_process_p50_s": p50(results_in_process),
            "km_agent_results_wall_p50_s": p50(results_cli),
            "results_asking_the_sandbox_p50_s": p50(results_from_sandbox),
        }
    finally:
        km("destroy", sandbox, "--yes")
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0
    for name, value in numbers.items():
        goal = GOALS.get(name)
        ratio = f"  ({value / goal:.2f} of the {goal:g} s goal)" if goal else ""
        print(f"{name:<40} {value:8.3f} s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
