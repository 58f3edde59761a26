"""The host agent bundle an ec2 instance installs at first boot when its image lacks the daemon, run for
real inside a local sandbox (the same Debian userland a stock image gives): the installer takes Python,
libbpf and tmux from the system, the daemon's dependencies from what is installed (the sandbox's egress
is default-deny, so nothing is fetched), and the compiled BPF objects from the bundle itself."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from controller.images.store import Image
from controller.substrates.ec2.bundle import build_bundle
from host_agent.version import __version__

KM = str(Path(sys.executable).parent / "km")
PROFILE = """\
apiVersion: klankermaker.ai/v1alpha1
kind: SandboxProfile
metadata: {name: bundle, prefix: bndl}
spec:
  lifecycle: {ttl: "1h", idleTimeout: "30m", teardownPolicy: destroy}
  runtime: {substrate: local, instanceType: t3.small, region: us-east-1, ami: debian-12}
  execution: {shell: /bin/bash, workingDir: /workspace}
  network:
    enforcement: ebpf
    egress: {allowedDNSSuffixes: [.example.com]}
"""
# Installed into the sandbox's existing virtualenv (its dependencies are there, and nothing may be
# downloaded), under a command name of its own.
INSTALL = (
    "set -e; rm -rf /opt/km/bundle-test; mkdir -p /opt/km/bundle-test; "
    "base64 -d | tar -xz -C /opt/km/bundle-test --no-same-owner; "
    "KM_HOST_AGENT_VENV=/opt/km/venv KM_HOST_AGENT_BIN=/usr/local/bin/km-host-agent-bundled "
    "bash /opt/km/bundle-test/install-host-agent.sh"
)
CHECK = (
    "/usr/local/bin/km-host-agent-bundled --version; "
    "/opt/km/venv/bin/python -c 'import ebpf.objects as o; [print(p.name) for p in o.build_all()]'; "
    "command -v clang clang-14 clang-15 clang-16 || echo no-compiler"
)


def km(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KM, *args], capture_output=True, text=True, input=stdin, timeout=600, env=os.environ.copy())


def test_the_bundle_installs_a_working_host_agent_offline(local_env: Path, debian_image: Image, tmp_path: Path) -> None:
    profile = tmp_path / "bundle.yaml"
    profile.write_text(PROFILE)
    created = km("create", str(profile), "--json")
    assert created.returncode == 0, created.stderr
    sandbox_id = json.loads(created.stdout)["sandbox"]["id"]
    try:
        bundle = build_bundle()

        installed = km("shell", "bundle", "--root", "--", "bash", "-c", INSTALL, stdin=base64.b64encode(bundle.data).decode())

        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert f"km-host-agent install: km-host-agent {__version__}" in installed.stdout
        checked = km("shell", "bundle", "--root", "--", "bash", "-c", CHECK)
        lines = checked.stdout.split()
        assert lines[:2] == ["km-host-agent", __version__], checked.stdout + checked.stderr
        # The objects the daemon loads were found under their source hashes, with no compiler to make them.
        assert sorted(name.split("-")[0] for name in lines[2:4]) == ["gate", "tls_capture"]
        assert lines[4:] == ["no-compiler"]
        again = km("shell", "bundle", "--root", "--", "bash", "-c", INSTALL, stdin=base64.b64encode(bundle.data).decode())
        assert again.returncode == 0, again.stderr  # idempotent
    finally:
        assert km("destroy", sandbox_id, "--yes").returncode == 0
