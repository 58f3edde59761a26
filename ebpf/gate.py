"""The egress gate's loader: compiles `gate.bpf.c` with BCC, attaches it to a cgroup and edits its maps.

The six cgroup sock_addr programs decide every connect() and unconnected UDP send of the tasks under
one cgroup v2 directory (except exempt cgroups): loopback and allowlisted addresses pass, DNS goes to
the sandbox's resolver, everything else fails with EPERM (or, in log mode, passes and is reported).

Attachment is legacy `BPF_PROG_ATTACH` without flags, on purpose: such programs stay attached when this
process exits, so a crashed daemon leaves the sandbox closed, and a restarted daemon's attach replaces
them atomically, with no moment in which nothing is attached.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SOURCE = Path(__file__).with_name("gate.bpf.c")

Mode = Literal["enforce", "log"]
_MODES: dict[str, int] = {"enforce": 0, "log": 1}

# (function in gate.bpf.c, enum bpf_attach_type from uapi/linux/bpf.h). Receive hooks come first so
# that replies can already be restored when the first query is redirected.
_PROGRAMS: tuple[tuple[str, int], ...] = (
    ("gate_recvmsg4", 19),  # BPF_CGROUP_UDP4_RECVMSG
    ("gate_recvmsg6", 20),  # BPF_CGROUP_UDP6_RECVMSG
    ("gate_sendmsg4", 14),  # BPF_CGROUP_UDP4_SENDMSG
    ("gate_sendmsg6", 15),  # BPF_CGROUP_UDP6_SENDMSG
    ("gate_connect4", 10),  # BPF_CGROUP_INET4_CONNECT
    ("gate_connect6", 11),  # BPF_CGROUP_INET6_CONNECT
)
_PROG_TYPE_CGROUP_SOCK_ADDR = 18

COUNTERS = ("allowed", "denied", "would_deny", "redirected", "events_dropped")
VERDICTS = ("allow", "deny", "would-deny", "redirect")
_PROTOCOLS = {6: "tcp", 17: "udp"}
_FAMILIES = {2: 4, 10: 6}

# struct gate_event in gate.bpf.c
_EVENT = struct.Struct("=QIIHBBB3x16s16s")

# Debian's 6.1 headers, merged into one tree, for hosts without /lib/modules/$(uname -r)/{build,source}.
_MERGED_HEADERS = Path("/opt/bcc-kheaders")


class GateError(Exception):
    """The gate could not be compiled, attached or edited; the message names what and the kernel's reason."""


@dataclass(frozen=True)
class GateEvent:
    """One decision reported by the kernel (denials always, allows and redirects when auditing).

    `ts_ns` is CLOCK_MONOTONIC; `pid` is in the sandbox's pid namespace when the gate was given one and
    the task is in it, else the host pid; `family` is 4 or 6 (the socket's family: an AF_INET6 socket
    reaching a v4-mapped address reports 6 with the IPv4 address as text).
    """

    ts_ns: int
    pid: int
    uid: int
    family: int
    proto: str
    verdict: str
    address: str
    port: int
    comm: str


def cgroup_id(path: Path) -> int:
    """The id BPF helpers report for a cgroup v2 directory: its inode number."""
    return os.stat(path).st_ino


def parse_event(raw: bytes) -> GateEvent:
    """Decode one ring buffer record; kept pure so the layout is tested without a kernel."""
    ts_ns, pid, uid, port, family, proto, verdict, address, comm = _EVENT.unpack(raw[: _EVENT.size])
    text: str
    if family == 2:
        text = str(ipaddress.IPv4Address(address[:4]))
    else:
        v6 = ipaddress.IPv6Address(address)
        text = str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)
    return GateEvent(
        ts_ns=ts_ns,
        pid=pid,
        uid=uid,
        family=_FAMILIES.get(family, family),
        proto=_PROTOCOLS.get(proto, str(proto)),
        verdict=VERDICTS[verdict] if verdict < len(VERDICTS) else str(verdict),
        address=text,
        port=port,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
    )


def allow_key(network: str) -> tuple[int, int, bytes]:
    """Map an allowlist entry to (IP version, prefix length, address bytes) as the LPM tries store it.

    Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`) so allow and revoke always name the same key.
    A v4-mapped IPv6 network goes to the IPv4 trie: the programs check v4-mapped destinations there.
    """
    try:
        parsed = ipaddress.ip_network(network.strip(), strict=False)
    except ValueError as exc:
        raise GateError(f"not an IP address or network: {network!r}") from exc
    if isinstance(parsed, ipaddress.IPv6Network) and parsed.prefixlen >= 96:
        mapped = parsed.network_address.ipv4_mapped
        if mapped is not None:
            return 4, parsed.prefixlen - 96, mapped.packed
    return parsed.version, parsed.prefixlen, parsed.network_address.packed


def _kernel_dev(dev: int) -> int:
    """st_dev as the kernel's internal dev_t (major << 20 | minor), which bpf_get_ns_current_pid_tgid compares."""
    return (os.major(dev) << 20) | os.minor(dev)


def _net_u32(packed: bytes) -> int:
    """Four network-order bytes as the native u32 whose memory holds them (how bpf_sock_addr stores addresses)."""
    value: int = struct.unpack("=I", packed)[0]
    return value


def _net_port(port: int) -> int:
    value: int = struct.unpack("=H", struct.pack("!H", port))[0]
    return value


def _ensure_kernel_headers() -> None:
    """BCC needs kernel headers; point it at the merged Debian tree when the /lib/modules links are missing."""
    release = os.uname().release
    linked = any(Path(f"/lib/modules/{release}/{part}/include/linux/kconfig.h").exists() for part in ("build", "source"))
    if not linked and "BCC_KERNEL_SOURCE" not in os.environ and (_MERGED_HEADERS / "include/linux/kconfig.h").exists():
        os.environ["BCC_KERNEL_SOURCE"] = str(_MERGED_HEADERS)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages from this process now
_COMPILER_LIBRARIES = ("LLVM", "clang", "libbcc")


def release_compiler_memory() -> None:
    """Give back what compiling cost: the daemon keeps the programs, not the compiler.

    BCC runs clang/LLVM in-process; after a compile the daemon held about 135 MB, most of it LLVM's
    code pages and freed heap (measured). Trimming the heap and paging the compiler libraries out
    brings it to about 35 MB; map updates afterwards touch only a few pages of libbcc. Best effort:
    an old kernel without MADV_PAGEOUT just keeps the memory.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and any(name in fields[5] for name in _COMPILER_LIBRARIES):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                libc.madvise(start, end - start, MADV_PAGEOUT)


class EgressGate:
    """The compiled programs and their maps. Compiling takes a fraction of a second (clang runs in-process)."""

    def __init__(
        self,
        *,
        resolver_v4: tuple[str, int],
        resolver_v6: tuple[str, int],
        mode: Mode,
        audit_allows: bool = False,
        pidns: tuple[int, int] | None = None,
    ) -> None:
        _ensure_kernel_headers()
        from bcc import BPF

        try:
            self._bpf: Any = BPF(src_file=str(SOURCE).encode())
            self._functions: list[tuple[str, int, Any]] = [
                (name, attach_type, self._bpf.load_func(name.encode(), _PROG_TYPE_CGROUP_SOCK_ADDR, attach_type=attach_type))
                for name, attach_type in _PROGRAMS
            ]
        except Exception as exc:  # BCC raises bare Exception for compile and verifier failures
            raise GateError(f"compiling {SOURCE.name}: {exc}") from exc
        self._events: list[GateEvent] = []
        self._bpf[b"events"].open_ring_buffer(self._on_event)

        ip4 = ipaddress.IPv4Address(resolver_v4[0]).packed
        ip6 = ipaddress.IPv6Address(resolver_v6[0]).packed
        config = self._bpf[b"config"]
        leaf = config.Leaf()
        leaf.mode = _MODES[mode]
        leaf.audit_allows = int(audit_allows)
        leaf.resolver_ip4 = _net_u32(ip4)
        leaf.resolver_port4 = _net_port(resolver_v4[1])
        for index in range(4):
            leaf.resolver_ip6[index] = _net_u32(ip6[index * 4 : index * 4 + 4])
        leaf.resolver_port6 = _net_port(resolver_v6[1])
        if pidns is not None:
            leaf.pidns_dev = _kernel_dev(pidns[0])
            leaf.pidns_ino = pidns[1]
        config[config.Key(0)] = leaf
        release_compiler_memory()

    # ---- attachment ------------------------------------------------------------------------------
    def attach(self, cgroup_dir: Path) -> None:
        """Attach all six programs, replacing whatever an earlier loader attached there (no gap)."""
        from bcc.libbcc import lib

        fd = self._open_cgroup(cgroup_dir)
        try:
            for name, attach_type, function in self._functions:
                result = lib.bpf_prog_attach(function.fd, fd, attach_type, 0)
                if result < 0:
                    raise GateError(f"attaching {name} to {cgroup_dir}: {os.strerror(-result)}")
        finally:
            os.close(fd)

    def detach(self, cgroup_dir: Path) -> None:
        """Detach whatever gate programs are attached there (ours or a previous loader's); idempotent."""
        from bcc.libbcc import lib

        fd = self._open_cgroup(cgroup_dir)
        try:
            for name, attach_type, function in self._functions:
                result = lib.bpf_prog_detach2(function.fd, fd, attach_type)
                if result < 0 and -result != errno.ENOENT:
                    raise GateError(f"detaching {name} from {cgroup_dir}: {os.strerror(-result)}")
        finally:
            os.close(fd)

    @staticmethod
    def _open_cgroup(cgroup_dir: Path) -> int:
        try:
            return os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise GateError(f"opening cgroup {cgroup_dir}: {exc.strerror}") from exc

    # ---- maps ------------------------------------------------------------------------------------
    def set_exempt(self, cgroup_ids: Iterable[int]) -> None:
        """Make these cgroups (and everything below them) ungated. New ids go in before stale ones leave,
        so a cgroup in both the old and the new set is never gated in between."""
        exempt = self._bpf[b"exempt"]
        wanted = {int(cgroup) for cgroup in cgroup_ids}
        for cgroup in wanted:
            exempt[exempt.Key(cgroup)] = exempt.Leaf(1)
        for key in list(exempt.keys()):
            if key.value not in wanted:
                del exempt[key]

    def allow(self, network: str) -> None:
        """Let the sandbox reach an address or network (`1.2.3.4`, `10.0.0.0/8`, `2001:db8::/32`)."""
        trie, key = self._trie_key(network)
        trie[key] = trie.Leaf(1)

    def revoke(self, network: str) -> None:
        """Remove exactly the entry `allow(network)` made; new connections fail, open ones stay up."""
        trie, key = self._trie_key(network)
        try:
            del trie[key]
        except KeyError:
            pass

    def entries(self) -> list[str]:
        """What the kernel's allow tries hold now, as CIDR text (`10.0.0.5/32`), IPv4 first."""
        found: list[str] = []
        for name, version in ((b"allow4", 4), (b"allow6", 6)):
            for key in self._bpf[name].keys():
                address = ipaddress.ip_address(bytes(key.addr))
                assert address.version == version
                found.append(f"{address}/{key.prefixlen}")
        return found

    def _trie_key(self, network: str) -> tuple[Any, Any]:
        version, prefixlen, packed = allow_key(network)
        trie = self._bpf[b"allow4" if version == 4 else b"allow6"]
        key = trie.Key()
        key.prefixlen = prefixlen
        ctypes.memmove(key.addr, packed, len(packed))
        return trie, key

    def set_mode(self, mode: Mode) -> None:
        """Enforce (deny with EPERM) or log (allow and report would-deny); takes effect on the next call."""
        self._update_config(mode=_MODES[mode])

    def set_audit_allows(self, audit_allows: bool) -> None:
        """Report every allowed connection and redirect too (learn mode needs every attempt)."""
        self._update_config(audit_allows=int(audit_allows))

    def _update_config(self, **fields: int) -> None:
        config = self._bpf[b"config"]
        leaf = config[config.Key(0)]
        for name, value in fields.items():
            setattr(leaf, name, value)
        config[config.Key(0)] = leaf

    # ---- observation -----------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Decisions since compile, summed over CPUs."""
        table = self._bpf[b"counters"]
        return {name: int(table.sum(table.Key(index)).value) for index, name in enumerate(COUNTERS)}

    def poll_events(self, timeout_ms: int) -> list[GateEvent]:
        """Wait up to `timeout_ms` for events and return all that are ready (oldest first). One reader only."""
        self._bpf.ring_buffer_poll(timeout_ms)
        ready, self._events = self._events, []
        return ready

    def _on_event(self, _context: Any, data: Any, size: int) -> int:
        self._events.append(parse_event(ctypes.string_at(data, size)))
        return 0
