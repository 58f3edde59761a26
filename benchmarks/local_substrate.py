"""Local substrate benchmarks: create → host agent ready, no-op convergence, destroy, idle memory, 20 at once.

Run as root after a bake (`doit bake:debian-12 bake:amazon-linux-2023`):

    .venv/bin/python benchmarks/local_substrate.py [--runs 5] [--parallel 20] [--json]

Prints numbers and their ratio to the issue's goals; it asserts nothing (machines here are shared and
noisy). Uses a private state and sandbox directory, so it never touches an operator's sandboxes.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: bench, prefix: bn}
spec:
  lifecycle: {ttl: "1h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
  execution: {shell: /bin/bash, workingDir: /workspace}
  network: {enforcement: ebpf, egress: {allowedDNSSuffixes: [.example.com]}}
"""
GOALS = {
    "create_p50_s": 1.0,
    "create_in_process_p50_s": 1.0,
    "noop_converge_s": 0.5,
    "destroy_p50_s": 1.0,
    "idle_memory_mib": 80.0,
}


def km(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "km"), *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"km {' '.join(args)} failed: {result.stderr}")
    return result


def timed(function, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def create(profile: Path, alias: str) -> dict[str, object]:
    return dict(json.loads(km("create", str(profile), "--alias", alias, "--json").stdout)["sandbox"])


def machine_memory_mib(sandbox_id: str) -> float:
    """Proportional set size of every process of the machine (its cgroup tree) plus nspawn itself."""
    unified = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified").is_dir() else Path("/sys/fs/cgroup")
    pids = set()
    for procs in (unified / f"km-nspawn-{sandbox_id}").rglob("cgroup.procs"):
        pids |= {int(line) for line in procs.read_text().split()}
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    work = Path(tempfile.mkdtemp(prefix="km-bench-"))
    os.environ.update({"KM_STATE_DIR": str(work / "state"), "KM_SANDBOX_DIR": str(work / "sandboxes")})
    profile = work / "bench.yaml"
    profile.write_text(PROFILE)
    results: dict[str, object] = {}

    create(profile, "warmup")  # bakes if needed, warms the page cache
    km("destroy", "warmup", "--yes")

    creates, destroys, noops, memory = [], [], [], []
    for run in range(args.runs):
        seconds, sandbox = timed(create, profile, f"b{run}")
        creates.append(seconds)
        noops.append(timed(km, "create", str(profile), "--alias", f"b{run}")[0])
        time.sleep(3)  # let the machine settle before measuring its idle memory
        memory.append(machine_memory_mib(str(sandbox["id"])))
        destroys.append(timed(km, "destroy", f"b{run}", "--yes")[0])
    # The same create without the CLI's start-up (the goal is about the machine: create → agent ready).
    from controller.sandboxes import converge, resolve

    in_process = []
    for run in range(args.runs):
        seconds, result = timed(lambda alias: converge(str(profile), alias=alias, substrate="local"), f"i{run}")
        in_process.append(seconds)
        record, substrate = resolve(f"i{run}")
        substrate.destroy(record)
    results["create_in_process_p50_s"] = statistics.median(in_process)
    doit = [timed(subprocess.run, [str(BIN / "doit"), "create:sealed", "--substrate", "local"])[0] for _ in range(2)]
    km("destroy", "sealed", "--yes")
    results["create_p50_s"] = statistics.median(creates)
    results["noop_converge_s"] = statistics.median(noops)
    results["noop_doit_create_s"] = doit[-1]
    results["destroy_p50_s"] = statistics.median(destroys)
    results["idle_memory_mib"] = statistics.median(memory)

    def create_exit_code(number: int) -> int:
        command = [str(BIN / "km"), "create", str(profile), "--alias", f"p{number}"]
        return subprocess.run(command, capture_output=True, text=True).returncode

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(create_exit_code, range(args.parallel)))
        results[f"parallel_{args.parallel}_create_s"] = time.perf_counter() - start
    listed = json.loads(km("list", "--json").stdout)
    results[f"parallel_{args.parallel}_running"] = sum(1 for s in listed if s["status"] == "running")
    results[f"parallel_{args.parallel}_failures"] = sum(1 for code in outcomes if code)
    for sandbox in listed:
        km("destroy", sandbox["id"], "--yes")

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for key, value in results.items():
        goal = GOALS.get(key)
        ratio = f"  ({value / goal:.2f}× the goal of {goal})" if goal and isinstance(value, float) else ""
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:28} {shown}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
