"""A testinfra backend for km sandboxes: `testinfra.get_host("km://<id, alias or number>")`.

Commands enter the machine's namespaces with nsenter, as root. That is right for inspecting a sandbox
(files, units, users); it is not how sandbox processes are started, which go through the machine's
systemd into the agent slice.
"""

from __future__ import annotations

from typing import Any

import testinfra
import testinfra.backend
from testinfra.backend import base

from controller.sandboxes import resolve


class KmSandboxBackend(base.BaseBackend):  # type: ignore[misc]
    NAME = "km"

    def __init__(self, hostname: str, *args: Any, **kwargs: Any) -> None:
        record, _ = resolve(hostname)
        leader = record.resources.get("leader_pid")
        if not leader:
            raise RuntimeError(f"sandbox {hostname} is not running")
        self.leader_pid = leader
        super().__init__(hostname, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        result = self.run_local("nsenter -t %s -a /bin/sh -c %s", self.leader_pid, cmd)
        result.command = self.encode(cmd)
        return result


def sandbox_host(ref: str) -> testinfra.host.Host:
    testinfra.backend.BACKENDS.setdefault("km", f"{__name__}.KmSandboxBackend")
    return testinfra.get_host(f"km://{ref}")
