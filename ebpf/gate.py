"""The egress gate's loader: loads the compiled `gate.bpf.c`, attaches it to a cgroup and edits its maps.

The cgroup sock_addr programs decide every connect() and unconnected UDP send of the tasks under one
cgroup v2 directory (except exempt cgroups): loopback and allowlisted addresses pass, DNS goes to the
sandbox's resolver, in the proxy modes TCP goes to the sandbox's L7 forwarder, and everything else fails
with EPERM (or, in log mode, passes and is reported). Sockets other than TCP and UDP cannot be created,
and the daemon's own ports cannot be bound, in any mode.

Attachment is legacy `BPF_PROG_ATTACH` without flags, on purpose: such programs stay attached when this
process exits, so a crashed daemon leaves the sandbox closed, and a restarted daemon's attach replaces
them atomically, with no moment in which nothing is attached.

The object is compiled ahead of time (ebpf/objects.py) and loaded with libbpf in milliseconds, instead
of compiling with BCC in the daemon on every start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ebpf import libbpf
from ebpf.kernel_ids import kernel_dev
from ebpf.objects import ObjectError, compiled_object

SOURCE = Path(__file__).with_name("gate.bpf.c")

Mode = Literal["enforce", "log"]
Enforcement = Literal["ebpf", "proxy", "both"]
_MODES: dict[str, int] = {"enforce": 0, "log": 1}
_ENFORCEMENTS: dict[str, int] = {"ebpf": 0, "proxy": 1, "both": 2}

# Programs in gate.bpf.c. Receive and getpeername hooks come first, and the connect hooks last, so that
# everything a redirected socket needs is in place before the first socket is redirected.
_PROGRAMS = (
    "gate_recvmsg4",
    "gate_recvmsg6",
    "gate_getpeername4",
    "gate_getpeername6",
    "gate_sockops",
    "gate_sock_create",
    "gate_bind4",
    "gate_bind6",
    "gate_sendmsg4",
    "gate_sendmsg6",
    "gate_connect4",
    "gate_connect6",
)

COUNTERS = (
    "allowed",
    "denied",
    "would_deny",
    "redirected",
    "events_dropped",
    "proxied",
    "sockets_denied",
    "binds_denied",
)
VERDICTS = ("allow", "deny", "would-deny", "redirect", "proxy")
HOOKS = ("connect", "socket", "bind")
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite", 255: "raw", 262: "mptcp"}
_SOCKET_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 6: "dccp", 10: "packet"}
_FAMILIES = {2: 4, 10: 6}
DAEMON_PORT_SLOTS = 4  # GATE_DAEMON_PORTS

# struct gate_event in gate.bpf.c
_EVENT = struct.Struct("=QIIHBBHBB16s16s")
# struct gate_config: mode, audit_allows, resolver ip4/port4, resolver ip6[4]/port6, enforcement,
# pidns dev/ino, proxy ip4/port4, proxy ip6[4]/port6, daemon_ports[4], reserved. Not pinned: a daemon
# with another layout loads over old pins and writes its own config.
_CONFIG = struct.Struct(f"=II4sI16sIIQQ4sI16sI{DAEMON_PORT_SLOTS}II")
# struct origin: addr[4] (16 bytes), port (network order in the low 16 bits), family.
_ORIGIN = struct.Struct("=16sII")
_ALLOW_LEARNED, _ALLOW_STATIC = 1, 2
# Maps kept on a bpffs when the loader is given a pin directory: what a restarted daemon takes over.
PINNED_MAPS = ("allow4", "allow6", "exempt", "counters", "dns_origins", "proxy_origins", "proxy_clients")


class GateError(Exception):
    """The gate could not be compiled, attached or edited; the message names what and the kernel's reason."""


@dataclass(frozen=True)
class GateEvent:
    """One decision reported by the kernel (denials always, allows and redirects when auditing).

    `ts_ns` is CLOCK_MONOTONIC; `pid` is in the sandbox's pid namespace when the gate was given one and
    the task is in it, else the host pid; `family` is 4 or 6 (the socket's family: an AF_INET6 socket
    reaching a v4-mapped address reports 6 with the IPv4 address as text). `hook` is `connect` (a
    connect() or an unconnected send), `socket` (a socket of another protocol than TCP or UDP: no
    address or port, `socket_type` says which kind) or `bind` (one of the daemon's ports).
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
    hook: str = "connect"
    socket_type: str = ""


def parse_event(raw: bytes) -> GateEvent:
    """Decode one ring buffer record; kept pure so the layout is tested without a kernel."""
    ts_ns, pid, uid, port, family, verdict, proto, hook, socket_type, address, comm = _EVENT.unpack(raw[: _EVENT.size])
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
        hook=HOOKS[hook] if hook < len(HOOKS) else str(hook),
        socket_type=_SOCKET_TYPES.get(socket_type, str(socket_type)) if socket_type else "",
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


def _mismatched_pin(error: str, pins: Iterable[Path]) -> Path | None:
    """The existing pin libbpf says it could not reuse, if its message names one."""
    found = re.search(r"couldn't reuse pinned map at '([^']+)'", error)
    return next((pin for pin in pins if found and str(pin) == found.group(1) and pin.exists()), None)


def _net_port(port: int) -> int:
    """A host-order port as the u32 bpf_sock_addr holds: network-order bytes in the low 16 bits."""
    value: int = struct.unpack("=H", struct.pack("!H", port))[0]
    return value


def _host_port(port: int) -> int:
    value: int = struct.unpack("!H", struct.pack("=H", port & 0xFFFF))[0]
    return value


def _endpoint(address: str, port: int, family: int) -> tuple[bytes, int]:
    """(4 or 16 address bytes, network-order port) for the config, checking the address's family."""
    parsed = ipaddress.ip_address(address)
    if parsed.version != family:
        raise GateError(f"{address} is not an IPv{family} address")
    return parsed.packed, _net_port(port)


@dataclass(frozen=True)
class Endpoints:
    """Where the gate sends what it redirects, the resolver (DNS) and the L7 forwarder (proxy modes), and the
    daemon's ports that no gated task may bind."""

    resolver_v4: tuple[str, int]
    resolver_v6: tuple[str, int]
    proxy_v4: tuple[str, int] | None = None
    proxy_v6: tuple[str, int] | None = None
    daemon_ports: tuple[int, ...] = ()


class EgressGate:
    """The loaded programs and their maps. Loading takes milliseconds; the object was compiled earlier."""

    def __init__(
        self,
        *,
        resolver_v4: tuple[str, int],
        resolver_v6: tuple[str, int],
        mode: Mode,
        audit_allows: bool = False,
        pidns: tuple[int, int] | None = None,
        enforcement: Enforcement = "ebpf",
        proxy_v4: tuple[str, int] | None = None,
        proxy_v6: tuple[str, int] | None = None,
        pin_dir: Path | None = None,
        daemon_ports: Sequence[int] = (),
    ) -> None:
        """`pin_dir` (a directory on a bpffs): keep the maps there, and reuse those a previous loader left,
        so a restarted daemon keeps what the sandbox had learned. Without it every load starts empty.
        `daemon_ports`: ports (TCP and UDP, any address) that only exempt tasks may bind, at most four."""
        if enforcement != "ebpf" and (proxy_v4 is None or proxy_v6 is None):
            raise GateError(f"enforcement {enforcement!r} needs the forwarder's addresses (proxy_v4, proxy_v6)")
        if len(daemon_ports) > DAEMON_PORT_SLOTS or not all(0 < port < 65536 for port in daemon_ports):
            raise GateError(f"daemon_ports takes up to {DAEMON_PORT_SLOTS} ports in 1..65535, not {list(daemon_ports)}")
        self._endpoints = Endpoints(resolver_v4, resolver_v6, proxy_v4, proxy_v6, tuple(daemon_ports))
        self._settings = {
            "mode": _MODES[mode],
            "audit_allows": int(audit_allows),
            "enforcement": _ENFORCEMENTS[enforcement],
            "pidns_dev": kernel_dev(pidns[0]) if pidns else 0,
            "pidns_ino": pidns[1] if pidns else 0,
        }
        self.adopted = False
        self.discarded: str | None = None
        try:
            self._object = self._load(pin_dir)
            self._programs = [self._object.program(name) for name in _PROGRAMS]
            self._maps = {
                name: self._object.map(name)
                for name in ("config", "exempt", "allow4", "allow6", "counters", "events", "proxy_clients")
            }
        except (OSError, ObjectError) as exc:
            raise GateError(f"loading {SOURCE.name}: {exc}") from exc
        self._events: list[GateEvent] = []
        self._ring = libbpf.RingBuffer(self._maps["events"], lambda raw: self._events.append(parse_event(raw)))
        self._write_config()

    def _load(self, pin_dir: Path | None) -> libbpf.BpfObject:
        built = compiled_object(SOURCE)
        if pin_dir is None:
            return libbpf.BpfObject(built)
        pins = {name: pin_dir / name for name in PINNED_MAPS}
        self.adopted = any(pin.exists() for pin in pins.values())
        discarded: list[str] = []
        while True:
            try:
                return libbpf.BpfObject(built, pins)
            except OSError as error:
                if not any(pin.exists() for pin in pins.values()):
                    raise
                # A map of an older, incompatible layout (a counter added, say): that one starts empty, the
                # others (what was learned) are kept. libbpf names one mismatch per attempt; an error naming
                # none drops every pin. Fail closed still holds: the old programs stay attached until the
                # new ones replace them. Each round removes at least one pin, so this ends.
                mismatched = _mismatched_pin(str(error), pins.values())
                for pin in [mismatched] if mismatched else pins.values():
                    pin.unlink(missing_ok=True)
                discarded.append(str(error))
                self.discarded = "; ".join(discarded)
                self.adopted = any(pin.exists() for pin in pins.values())

    def close(self) -> None:
        """Release this process's handles; attached programs stay attached (fail closed)."""
        self._ring.close()
        self._object.close()

    # ---- attachment ------------------------------------------------------------------------------
    def attach(self, cgroup_dir: Path) -> None:
        """Attach every program, replacing whatever an earlier loader attached there (no gap)."""
        fd = self._open_cgroup(cgroup_dir)
        try:
            for program in self._programs:
                try:
                    libbpf.attach_to_cgroup(program, fd)
                except OSError as exc:
                    raise GateError(f"attaching {program.name} to {cgroup_dir}: {exc}") from exc
        finally:
            os.close(fd)

    def detach(self, cgroup_dir: Path) -> None:
        """Detach whatever gate programs are attached there (ours or a previous loader's); idempotent."""
        fd = self._open_cgroup(cgroup_dir)
        try:
            for program in reversed(self._programs):  # connect hooks first: stop redirecting before the rest goes
                try:
                    libbpf.detach_from_cgroup(program, fd)
                except OSError as exc:
                    raise GateError(f"detaching {program.name} from {cgroup_dir}: {exc}") from exc
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
        exempt = self._maps["exempt"]
        wanted = {struct.pack("=Q", int(cgroup)) for cgroup in cgroup_ids}
        for key in wanted:
            exempt.update(key, b"\x01")
        for key in exempt.keys():
            if key not in wanted:
                exempt.delete(key)

    def allow(self, network: str, *, static: bool = False) -> None:
        """Let the sandbox reach an address or network (`1.2.3.4`, `10.0.0.0/8`, `2001:db8::/32`).

        `static` entries (allowedCIDRs) are reached directly even in the proxy modes; others (addresses
        an allowed name resolved to) go through the forwarder there.
        """
        trie, key = self._trie_key(network)
        trie.update(key, bytes([_ALLOW_STATIC if static else _ALLOW_LEARNED]))

    def revoke(self, network: str) -> None:
        """Remove exactly the entry `allow(network)` made; new connections fail, open ones stay up."""
        trie, key = self._trie_key(network)
        trie.delete(key)

    def entries(self) -> list[str]:
        """What the kernel's allow tries hold now, as CIDR text (`10.0.0.5/32`), IPv4 first."""
        return [text for _trie, _key, text in self._allow_entries()]

    def entries_by_kind(self) -> dict[str, bool]:
        """Every allow entry (CIDR text, as `entries()`) and whether it is static (allowedCIDRs)."""
        found: dict[str, bool] = {}
        for trie, key, text in self._allow_entries():
            value = trie.lookup(key)
            found[text] = value is not None and value[0] == _ALLOW_STATIC
        return found

    def _allow_entries(self) -> Iterator[tuple[libbpf.Map, bytes, str]]:
        """(trie, raw key, CIDR text) for every entry of both tries, IPv4 first."""
        for name, size in (("allow4", 4), ("allow6", 16)):
            trie = self._maps[name]
            for key in trie.keys():
                prefixlen = struct.unpack_from("=I", key)[0]
                yield trie, key, f"{ipaddress.ip_address(key[4 : 4 + size])}/{prefixlen}"

    def _trie_key(self, network: str) -> tuple[libbpf.Map, bytes]:
        version, prefixlen, packed = allow_key(network)
        return self._maps["allow4" if version == 4 else "allow6"], struct.pack("=I", prefixlen) + packed

    def set_mode(self, mode: Mode) -> None:
        """Enforce (deny with EPERM) or log (allow and report would-deny); takes effect on the next call."""
        self._settings["mode"] = _MODES[mode]
        self._write_config()

    def set_audit_allows(self, audit_allows: bool) -> None:
        """Report every allowed connection and redirect too (learn mode needs every attempt)."""
        self._settings["audit_allows"] = int(audit_allows)
        self._write_config()

    def set_enforcement(self, enforcement: Enforcement) -> None:
        if enforcement != "ebpf" and self._endpoints.proxy_v4 is None:
            raise GateError(f"enforcement {enforcement!r} needs the forwarder's addresses")
        self._settings["enforcement"] = _ENFORCEMENTS[enforcement]
        self._write_config()

    def _write_config(self) -> None:
        """The whole config value in one map update: the programs never see half a change."""
        points = self._endpoints
        resolver_ip4, resolver_port4 = _endpoint(*points.resolver_v4, family=4)
        resolver_ip6, resolver_port6 = _endpoint(*points.resolver_v6, family=6)
        proxy_ip4, proxy_port4 = _endpoint(*points.proxy_v4, family=4) if points.proxy_v4 else (bytes(4), 0)
        proxy_ip6, proxy_port6 = _endpoint(*points.proxy_v6, family=6) if points.proxy_v6 else (bytes(16), 0)
        settings = self._settings
        daemon_ports = [_net_port(port) for port in points.daemon_ports]
        daemon_ports += [0] * (DAEMON_PORT_SLOTS - len(daemon_ports))
        value = _CONFIG.pack(
            settings["mode"],
            settings["audit_allows"],
            resolver_ip4,
            resolver_port4,
            resolver_ip6,
            resolver_port6,
            settings["enforcement"],
            settings["pidns_dev"],
            settings["pidns_ino"],
            proxy_ip4,
            proxy_port4,
            proxy_ip6,
            proxy_port6,
            *daemon_ports,
            0,
        )
        self._maps["config"].update(struct.pack("=I", 0), value)

    # ---- the forwarder's lookups -----------------------------------------------------------------
    def proxy_origin(self, family: int, client_port: int) -> tuple[str, int] | None:
        """Where a proxied client (the forwarder sees its family and source port) meant to connect.

        The entry is taken out: each connection is looked up once, and the map never fills with them.
        """
        key = struct.pack("=II", family, client_port)
        clients = self._maps["proxy_clients"]
        raw = clients.lookup(key)
        if raw is None:
            return None
        clients.delete(key)
        address, port, origin_family = _ORIGIN.unpack(raw[: _ORIGIN.size])
        text = str(ipaddress.IPv4Address(address[:4])) if origin_family == 2 else str(ipaddress.IPv6Address(address))
        return text, _host_port(port)

    # ---- observation -----------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Decisions since load, summed over CPUs."""
        return self._maps["counters"].u64_totals(COUNTERS)

    def poll_events(self, timeout_ms: int) -> list[GateEvent]:
        """Wait up to `timeout_ms` for events and return all that are ready (oldest first). One reader only."""
        self._ring.poll(timeout_ms)
        ready, self._events = self._events, []
        return ready
