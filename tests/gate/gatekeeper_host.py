"""The daemon's Gatekeeper, whole, in a network namespace of its own: what test_gatekeeper_wiring.py drives.

Run as `unshare --net python -m tests.gate.gatekeeper_host CGROUP STATE_DIR PIN_DIR EGRESS_JSON` from the
repository root. In its fresh namespace it brings loopback up, puts the lab's addresses on it with a TCP
service answering `<address>|<what it got>`, starts a fake upstream DNS server, and starts a Gatekeeper on
CGROUP with its real fixed ports (nothing else in this namespace holds them). Gated children join the
namespace with `nsenter --net=/proc/PID/ns/net`; a restarted daemon is run in the same way. Then it takes one JSON request a line on stdin (`reload`
with an egress policy, `status`, `tick`, `stop`) and answers one JSON line each on stdout.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.gatekeeper.component import Gatekeeper
from tests.gate.resolver_wiring import FakeUpstream

SERVICE_PORT = 7777
PUBLIC_V4, OTHER_V4, PRIVATE_V4 = "198.18.77.2", "198.18.77.3", "10.99.0.5"
ZONE = {
    "site.allowed.test": [("A", PUBLIC_V4, 300)],
    "other.test": [("A", OTHER_V4, 300)],
    "lan.allowed.test": [("A", PRIVATE_V4, 300)],  # an allowed public name pointing into a private range
}


def config(egress: dict[str, Any]) -> HostAgentConfig:
    return HostAgentConfig.model_validate(
        {
            "profile": "wiring",
            "substrate": "local",
            "region": "eu-west-1",
            "lifecycle": {"ttl_seconds": 0, "idle_timeout_seconds": 60, "teardown_policy": "destroy"},
            "execution": {"working_dir": "/tmp", "shell": "/bin/sh"},
            "egress": {"enforcement": "ebpf", "mode": "enforce", **egress},
        }
    )


def serve(listener: socket.socket) -> None:
    while True:
        connection, _peer = listener.accept()
        with connection:
            data = connection.recv(4096)
            connection.sendall(f"{connection.getsockname()[0]}|".encode() + data)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cgroup, state, pin_dir, egress = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in (PUBLIC_V4, OTHER_V4, PRIVATE_V4):
        subprocess.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], check=True)  # again on a restart
    listener = socket.create_server(("0.0.0.0", SERVICE_PORT))
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    upstream = FakeUpstream(ZONE)
    identity = SandboxIdentity(sandbox_id="wiring", dns_upstream="{}:{}".format(*upstream.address))
    gatekeeper = Gatekeeper(
        config(egress),
        identity,
        cgroup,
        learn_report=state / "learn-report.json",
        pin_dir=Path(pin_dir) if pin_dir != "-" else None,
        policy_record=state / "gate-policy.json",
    )
    gatekeeper.start()
    print(json.dumps({"ready": True, "adopted": gatekeeper.gate.adopted}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer: Any = None
        if request["op"] == "reload":
            gatekeeper.reload(config(request["egress"]))
        elif request["op"] == "status":
            answer = gatekeeper.status()
        elif request["op"] == "tick":
            gatekeeper.tick()
        elif request["op"] == "stop":
            gatekeeper.stop()
            gatekeeper.gate.close()
            print(json.dumps({"ok": True}), flush=True)
            return
        print(json.dumps({"ok": True, "answer": answer}), flush=True)


if __name__ == "__main__":
    main()
