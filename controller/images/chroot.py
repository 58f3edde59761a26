"""Run shell scripts inside an image being baked.

Each script runs in its own mount namespace (`unshare --mount`) where /proc, /sys and /dev are bound
into the root: the mounts vanish with the process, so a killed bake leaves no mounts behind.
Services are kept from starting inside the chroot by a temporary `policy-rc.d`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BakeError(Exception):
    """A bake step failed; the message names the step, the exit code and the end of its output."""


def run_logged(argv: list[str], step: str, log_file: Path, env: dict[str, str] | None = None) -> None:
    with log_file.open("a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise BakeError(f"{step} failed with exit code {result.returncode} (full log: {log_file}):\n{tail}")


def run_in_chroot(rootfs: Path, script: str, step: str, log_file: Path) -> None:
    root = shlex.quote(str(rootfs))
    wrapper = "\n".join(
        [
            "set -euo pipefail",
            f"mount --bind /proc {root}/proc",
            f"mount --rbind /sys {root}/sys",
            f"mount --rbind /dev {root}/dev",
            f"printf '#!/bin/sh\\nexit 101\\n' > {root}/usr/sbin/policy-rc.d && chmod 0755 {root}/usr/sbin/policy-rc.d",
            f"trap 'rm -f {root}/usr/sbin/policy-rc.d' EXIT",
            f"chroot {root} /usr/bin/env -i PATH={CHROOT_PATH} DEBIAN_FRONTEND=noninteractive "
            f"LC_ALL=C.UTF-8 /bin/bash -euo pipefail -c {shlex.quote(script)}",
        ]
    )
    run_logged(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], step, log_file)
