"""The socket families the agent may open, enforced by a seccomp filter of km's own.

The gate's cgroup/sock_create program sees only inet sockets (measured: the kernel calls it from
inet_create and inet6_create alone), and systemd's RestrictAddressFamilies cannot look at a netlink
socket's protocol and answers EAFNOSUPPORT. So every agent unit, while still root with CAP_SYS_ADMIN
(which is why no `no_new_privs` is needed: sudo keeps working), installs this filter before it becomes
the sandbox user: `socket()` succeeds only for AF_UNIX, AF_INET, AF_INET6 (whose types and protocols the
gate checks) and AF_NETLINK with NETLINK_ROUTE (what `ip` and glibc's getaddrinfo use); `socketpair()`
only for AF_UNIX. Other families get EPERM, whatever modules the kernel could load. Other netlink
protocols get EPROTONOSUPPORT, as on a kernel without them: sudo and PAM open NETLINK_AUDIT, carry on
when audit is absent, and refuse to work on EPERM (measured). The filter is inherited by everything
the agent starts and cannot be removed.

Calls from another ABI (i386 binaries on x86-64) pass this filter and meet systemd's family filter
only; the x32 ABI, which shares the native architecture value, is refused socket calls outright.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Final

NETLINK_ROUTE: Final = 0
ALLOWED_FAMILIES: Final = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
# (audit architecture, socket, socketpair) by machine; x32 numbers are the native ones with bit 30 set.
_ARCHES: Final[dict[str, tuple[int, int, int]]] = {
    "x86_64": (0xC000003E, 41, 53),
    "aarch64": (0xC00000B7, 198, 199),
}
_X32_BIT: Final = 0x40000000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_RET_ALLOW: Final = 0x7FFF0000
_RET_ERRNO: Final = 0x00050000
# classic BPF opcodes
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# offsets in struct seccomp_data: nr, arch, then args[] as 64-bit words (low half first on both arches)
_NR, _ARCH, _ARG0, _ARG2 = 0, 4, 16, 32


class SocketFilterError(OSError):
    """The filter could not be installed; the agent must not start without it."""


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jump if true, jump if false, k) instructions; a jump skips that many."""
    arch, socket_nr, socketpair_nr = _ARCHES[machine or platform.machine()]
    deny = _RET_ERRNO | errno.EPERM
    unix, inet, inet6 = ALLOWED_FAMILIES
    return [
        (_LD_W_ABS, 0, 0, _ARCH),  # 0
        (_JEQ_K, 1, 0, arch),  # 1: native → 3
        (_RET_K, 0, 0, _RET_ALLOW),  # 2: another ABI (systemd's family filter applies there)
        (_LD_W_ABS, 0, 0, _NR),  # 3
        (_JEQ_K, 4, 0, socket_nr),  # 4: → 9
        (_JEQ_K, 10, 0, socketpair_nr),  # 5: → 16
        (_JEQ_K, 12, 0, socket_nr | _X32_BIT),  # 6: → 19
        (_JEQ_K, 11, 0, socketpair_nr | _X32_BIT),  # 7: → 19
        (_RET_K, 0, 0, _RET_ALLOW),  # 8: not a socket call
        (_LD_W_ABS, 0, 0, _ARG0),  # 9: socket(family, type, protocol)
        (_JEQ_K, 7, 0, unix),  # 10: → 18
        (_JEQ_K, 6, 0, inet),  # 11: → 18
        (_JEQ_K, 5, 0, inet6),  # 12: → 18
        (_JEQ_K, 0, 5, socket.AF_NETLINK),  # 13: → 14, else → 19
        (_LD_W_ABS, 0, 0, _ARG2),  # 14
        (_JEQ_K, 2, 4, NETLINK_ROUTE),  # 15: → 18, else → 20
        (_LD_W_ABS, 0, 0, _ARG0),  # 16: socketpair(family, …)
        (_JEQ_K, 0, 1, unix),  # 17: → 18, else → 19
        (_RET_K, 0, 0, _RET_ALLOW),  # 18
        (_RET_K, 0, 0, deny),  # 19
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPROTONOSUPPORT),  # 20: netlink other than route looks absent
    ]


def install(machine: str | None = None) -> None:
    """Install the filter on this thread (and so on everything it execs); needs CAP_SYS_ADMIN or
    no_new_privs, and km's agent units have the first at this point."""
    instructions = program(machine)
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("=HxxxxxxQ" if struct.calcsize("P") == 8 else "=HxxI", len(instructions), ctypes.addressof(buffer))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    pointer = ctypes.c_void_p(ctypes.addressof(fprog_buffer))  # not a bare int: ctypes would pass 32 bits
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), pointer, ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise SocketFilterError(code, f"installing the agent's socket filter: {os.strerror(code)}")


def run(argv: Sequence[str]) -> int:
    """Install the filter, then become argv (the rest of the agent unit's command line)."""
    if not argv:
        print("km-host-agent socket-filter: nothing to run after the filter", file=sys.stderr)
        return 2
    try:
        install()
    except (SocketFilterError, KeyError) as error:
        print(f"km-host-agent socket-filter: {error}", file=sys.stderr)
        return 1
    os.execvp(argv[0], list(argv))
