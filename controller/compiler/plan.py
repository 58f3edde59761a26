"""Profile → plan files: a pure function from a validated profile to what a substrate needs.

`compile_profile` does no I/O; `write_plan` puts the result in `build/<name>/`, replacing each file
atomically and leaving unchanged files untouched so make-style tools see no spurious change.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.compiler.hashing import content_hash
from controller.compiler.host_agent_config import host_agent_config
from controller.compiler.iam import iam_policy
from controller.compiler.network import security_group_egress
from controller.compiler.userdata import render_policy_update, render_userdata
from controller.compiler.volumes import plan_volumes
from controller.profile import SandboxProfile
from host_agent.config import HostAgentConfig

# A profile that names no image is written for Amazon Linux 2023 wherever it runs: on the local
# substrate that is the image whose yum/dnf front ends run its initCommands unchanged.
DEFAULT_AMI = "amazon-linux-2023"
PLAN_FILES = ("plan.json", "userdata.sh", "iam-policy.json", "host-agent.json")
# Execution fields a running sandbox takes without a rebuild (the host agent rewrites them).
LIVE_EXECUTION_FIELDS = ("env", "configFiles")


@dataclass(frozen=True)
class CompiledPlan:
    """Everything that defines a sandbox of one profile, plus its content hashes."""

    name: str
    plan: dict[str, Any]
    userdata: str
    iam_policy: dict[str, Any]
    host_agent: HostAgentConfig
    # What a live policy change runs inside a running sandbox (not a plan file: derived, like userdata,
    # from the profile, and compared through the policy hash).
    policy_update: str = ""

    @property
    def hash(self) -> str:
        return str(self.plan["hash"])

    def files(self) -> dict[str, str]:
        return {
            "plan.json": _json(self.plan),
            "userdata.sh": self.userdata,
            "iam-policy.json": _json(self.iam_policy),
            "host-agent.json": self.host_agent.to_json(),
        }


def compile_profile(profile: SandboxProfile, ami_block_device_names: Iterable[str] = ()) -> CompiledPlan:
    """Compile a valid profile. `ami_block_device_names` are the image's mapped devices, if known."""
    runtime = profile.spec.runtime
    ami = runtime.ami or DEFAULT_AMI
    volumes = plan_volumes(profile, ami, ami_block_device_names)
    config = host_agent_config(profile)
    policy = iam_policy(profile)
    userdata = render_userdata(profile, volumes, config)
    body: dict[str, Any] = {
        "profile": profile.dump(),
        "sandbox": {
            "prefix": profile.metadata.prefix,
            "substrate": runtime.substrate,
            "region": runtime.region,
            "instanceType": runtime.instance_type,
            "ami": ami,
        },
        "securityGroup": {"egress": security_group_egress(profile)},
        "iamPolicy": policy,
        "volumes": [volume.as_json() for volume in volumes],
        "hostAgent": config.model_dump(mode="json"),
    }
    # What a running sandbox can take live (policy: host-agent.json, the environment file, configFiles)
    # versus what needs a new one (runtime: the machine's shape and what its first boot did).
    spec = body["profile"]["spec"]
    first_boot = {key: value for key, value in spec["execution"].items() if key not in LIVE_EXECUTION_FIELDS}
    runtime_part = {key: body[key] for key in ("sandbox", "securityGroup", "iamPolicy", "volumes")}
    runtime_part |= {"runtime": spec["runtime"], "execution": first_boot}
    live_part = {"hostAgent": body["hostAgent"], "configFiles": spec["execution"].get("configFiles", {})}
    hashes = {"runtime": content_hash(runtime_part), "policy": content_hash(live_part)}
    plan = {**body, "hash": content_hash({**body, "userdata": userdata}), "hashes": hashes}
    return CompiledPlan(profile.metadata.name, plan, userdata, policy, config, render_policy_update(profile, config))


def write_plan(compiled: CompiledPlan, out_dir: Path) -> list[Path]:
    """Write the plan files; returns the files whose content changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, content in compiled.files().items():
        target = out_dir / name
        if target.is_file() and target.read_bytes() == content.encode("utf-8"):
            continue
        _atomic_write(target, content, mode=0o755 if name.endswith(".sh") else 0o644)
        changed.append(target)
    return changed


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"


def _atomic_write(target: Path, content: str, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            stream.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
