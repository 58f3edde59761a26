"""How BPF helpers name kernel objects, from what userspace can stat: shared by every loader here."""

from __future__ import annotations

import os
from pathlib import Path


def cgroup_id(path: Path) -> int:
    """The id bpf_get_current_cgroup_id() reports for a cgroup v2 directory: its inode number."""
    return os.stat(path).st_ino


def kernel_dev(dev: int) -> int:
    """st_dev as the kernel's internal dev_t (major << 20 | minor), which bpf_get_ns_current_pid_tgid compares."""
    return (os.major(dev) << 20) | os.minor(dev)
