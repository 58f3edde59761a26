"""The agent's socket filter (host_agent/socket_filter.py), installed for real in a child process.

The child sets no_new_privs first, so the test needs no root (agent units install it with
CAP_SYS_ADMIN instead, keeping sudo usable); in a privileged sandbox the same filter is tried as root
through sudo (tests/sandbox/test_privileged.py).
"""

from __future__ import annotations

import errno
import json
import platform
import subprocess
import sys

import pytest

from host_agent.socket_filter import program

CHILD = """
import ctypes, json, socket
from host_agent.socket_filter import install
ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
install()
results = {}
def attempt(name, make):
    try:
        make().close()
        results[name] = 0
    except OSError as error:
        results[name] = error.errno
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("udp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("netlink-route", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("netlink-audit", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9))
attempt("netlink-generic", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
attempt("alg", lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET))
attempt("pair-unix", lambda: socket.socketpair(socket.AF_UNIX)[0])
print(json.dumps(results))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="the filter knows x86_64 and aarch64")
def test_only_unix_inet_and_route_netlink_sockets_are_created() -> None:
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert {name: code for name, code in outcome.items() if code == 0} == {
        "unix": 0, "tcp": 0, "udp6": 0, "netlink-route": 0, "pair-unix": 0,
    }  # fmt: skip
    assert {name: code for name, code in outcome.items() if code} == {
        "packet": errno.EPERM, "vsock": errno.EPERM, "alg": errno.EPERM,
        # absent rather than refused: sudo and PAM give up on EPERM from the audit socket
        "netlink-audit": errno.EPROTONOSUPPORT, "netlink-generic": errno.EPROTONOSUPPORT,
    }  # fmt: skip


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_jump_lands_inside_the_program_and_it_ends_in_returns(machine: str) -> None:
    instructions = program(machine)
    for index, (code, true_jump, false_jump, _k) in enumerate(instructions):
        if code == 0x15:
            assert index + 1 + max(true_jump, false_jump) < len(instructions)
    assert [code for code, *_ in instructions[-2:]] == [0x06, 0x06]
