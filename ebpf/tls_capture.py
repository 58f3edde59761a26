"""TLS plaintext capture: loads the compiled `tls_capture.bpf.c`, puts its uprobes on OpenSSL's
SSL_write/SSL_read (and the _ex variants) in each libssl a sandbox uses, and reads what they report.

A uprobe sits on a file's inode, so every process on the machine that maps that libssl takes the
trap (about 20 µs per SSL call on the reference VM) whether or not it is captured; only the tasks
under the target cgroups are captured, and that filter runs in the kernel, so the plaintext of other
sandboxes sharing the same image's libssl is never copied. Payloads are off unless asked for: by
default an event carries only who, which direction and how many bytes.

Statically linked TLS (BoringSSL in Bun, Go's crypto/tls, rustls) never calls libssl and is not
seen here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ebpf import libbpf
from ebpf.kernel_ids import cgroup_id, kernel_dev
from ebpf.objects import ObjectError, compiled_object

SOURCE = Path(__file__).with_name("tls_capture.bpf.c")
MAX_PAYLOAD_BYTES = 4096  # TLS_MAX_PAYLOAD in tls_capture.bpf.c
COUNTERS = ("captured", "lost", "unreadable")
DIRECTIONS: tuple[Literal["write"], Literal["read"]] = ("write", "read")

# (function, entry program); every function's return goes to the one return program.
_PROBES = (
    ("SSL_write", "ssl_write_entry"),
    ("SSL_read", "ssl_read_entry"),
    ("SSL_write_ex", "ssl_write_ex_entry"),
    ("SSL_read_ex", "ssl_read_ex_entry"),
)
_RETURN_PROGRAM = "ssl_call_return"
_PEER_PROGRAMS = ("sock_send_peer", "sock_recv_peer")  # raw tracepoints sock_send_length/sock_recv_length
_PEERS_REMEMBERED = 4096  # connections whose peer is kept for the calls that make no TCP call

# struct tls_event's header: ts_ns, ssl, pid, tid, uid, size, captured, direction, comm, family, port, address.
_EVENT = struct.Struct("=QQIIIIIB3x16sHH16s")
# struct tls_config: payload_bytes, reserved, pidns dev, pidns ino.
_CONFIG = struct.Struct("=IIQQ")


class TlsCaptureError(Exception):
    """Loading, attaching or configuring the capture failed; the message names what and the kernel's reason."""


@dataclass(frozen=True)
class TlsEvent:
    """One SSL_write/SSL_read call that moved bytes, made by a task under a target cgroup.

    `time` is wall-clock seconds since the epoch; `pid`/`tid` are in the pid namespace the capture was
    given when the task is in it, else host ids; `size` is what the call moved and `payload` its first
    bytes (empty unless the capture was made with payload_bytes > 0). `connection` is the SSL object's
    address: equal for calls on the same TLS connection of one process. `peer` is the remote (address,
    port) of the TCP connection under it, None when it could not be told.
    """

    time: float
    pid: int
    uid: int
    comm: str
    direction: Literal["write", "read"]
    size: int
    payload: bytes
    tid: int
    connection: int
    peer: tuple[str, int] | None = None


def _peer(family: int, port: int, address: bytes) -> tuple[str, int] | None:
    """The kernel's sockaddr parts as (address, port); a v4-mapped IPv6 peer is given as IPv4."""
    port = socket.ntohs(port)
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(address[:4])), port
    if family == socket.AF_INET6:
        v6 = ipaddress.IPv6Address(address)
        return str(v6.ipv4_mapped or v6), port
    return None


def parse_event(raw: bytes, clock_offset_ns: int = 0) -> TlsEvent:
    """Decode one ring buffer record; `clock_offset_ns` turns CLOCK_MONOTONIC into wall-clock time."""
    ts_ns, ssl, pid, tid, uid, size, captured, direction, comm, family, port, address = _EVENT.unpack_from(raw)
    return TlsEvent(
        time=(ts_ns + clock_offset_ns) / 1e9,
        pid=pid,
        uid=uid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        direction=DIRECTIONS[direction & 1],
        size=size,
        payload=raw[_EVENT.size : _EVENT.size + captured],
        tid=tid,
        connection=ssl,
        peer=_peer(family, port, address),
    )


# ---- ELF: where a library's exported functions are in its file ---------------------------------------

_ELF_MAGIC = b"\x7fELF"
_ELF_HEADER = "16sHHIQQQIHHHHHH"
_PROGRAM_HEADER = "IIQQQQQQ"
_SECTION_HEADER = "IIQQQQIIQQ"
_SYMBOL = "IBBHQQ"
_PT_LOAD = 1
_SHT_DYNSYM = 11
_STT_FUNC = 2
_SHN_UNDEF = 0


def function_offsets(library: Path, names: Iterable[str]) -> dict[str, int]:
    """File offsets of the named functions a 64-bit ELF library defines in its dynamic symbol table
    (what a uprobe is placed at); names it does not define are absent from the result.

    The symbol's value is a virtual address; the load segment holding it says where that is in the file.
    """
    wanted = set(names)
    image = library.read_bytes()
    if image[:4] != _ELF_MAGIC or image[4] != 2:
        raise TlsCaptureError(f"{library} is not a 64-bit ELF file")
    order = "<" if image[5] == 1 else ">"
    header = struct.unpack_from(order + _ELF_HEADER, image)
    program_offset, section_offset = header[5], header[6]
    program_size, program_count, section_size, section_count = header[9], header[10], header[11], header[12]

    segments = []
    for index in range(program_count):
        kind, _, offset, vaddr, _, filesz, _, _ = struct.unpack_from(
            order + _PROGRAM_HEADER, image, program_offset + index * program_size
        )
        if kind == _PT_LOAD:
            segments.append((vaddr, filesz, offset))
    sections = [
        struct.unpack_from(order + _SECTION_HEADER, image, section_offset + index * section_size)
        for index in range(section_count)
    ]

    found: dict[str, int] = {}
    symbol_format = struct.Struct(order + _SYMBOL)
    for section in sections:
        if section[1] != _SHT_DYNSYM:
            continue
        _, _, _, _, table_offset, table_size, link, _, _, entry_size = section
        strings_offset = sections[link][4]
        for position in range(table_offset, table_offset + table_size, entry_size or symbol_format.size):
            name_index, info, _, section_index, value, _ = symbol_format.unpack_from(image, position)
            if info & 0xF != _STT_FUNC or section_index == _SHN_UNDEF or value == 0:
                continue
            start = strings_offset + name_index
            name = image[start : image.index(b"\0", start)].decode(errors="replace")
            if name not in wanted or name in found:
                continue
            for vaddr, filesz, offset in segments:
                if vaddr <= value < vaddr + filesz:
                    found[name] = value - vaddr + offset
                    break
    return found


# ---- which libssl a process uses ---------------------------------------------------------------------

_LIBSSL_NAME = re.compile(r"libssl\.so(\.\d+)*")


def ssl_mappings(maps: str) -> dict[str, str]:
    """The libssl files in a /proc/<pid>/maps text: each path (as the reader of the text would name it,
    " (deleted)" removed) with one address range that maps it."""
    found: dict[str, str] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        path = fields[5].removesuffix(" (deleted)")
        if _LIBSSL_NAME.fullmatch(os.path.basename(path)):
            found.setdefault(path, fields[0])
    return found


def libraries_in_use(pids: Iterable[int]) -> set[Path]:
    """The libssl files these processes have mapped, as paths this process can open; processes that
    are gone meanwhile are skipped.

    /proc/<pid>/maps names files relative to the reader's root, so a chroot under ours needs nothing
    more. When that path is not the mapped file (a library deleted or replaced since it was mapped, a
    mount only the process's own namespace has), the file is reached through /proc/<pid>/map_files.
    """
    found: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for path, addresses in ssl_mappings(maps).items():
            mapped = Path(f"/proc/{pid}/map_files/{addresses}")
            try:
                identity = os.stat(mapped)
            except OSError:
                continue
            found.add(Path(path) if same_file(Path(path), identity) else mapped)
    return found


def same_file(path: Path, identity: os.stat_result) -> bool:
    """Whether `path` is (still) the file `identity` was taken of, by device and inode."""
    try:
        found = os.stat(path)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (identity.st_dev, identity.st_ino)


# ---- HTTP in captured plaintext ----------------------------------------------------------------------

_HTTP1_REQUEST = re.compile(rb"([A-Z][A-Z-]{0,19}) (\S+) HTTP/(1\.[01])\r?\n")
_HTTP1_RESPONSE = re.compile(rb"HTTP/(1\.[01]) ([1-5]\d\d)(?: ([^\r\n]*))?\r?\n")
_HOST_HEADER = re.compile(rb"^host:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_ABSOLUTE_TARGET = re.compile(rb"https?://([^/?#\s]+)")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_FRAMES = (
    "DATA",
    "HEADERS",
    "PRIORITY",
    "RST_STREAM",
    "SETTINGS",
    "PUSH_PROMISE",
    "PING",
    "GOAWAY",
    "WINDOW_UPDATE",
    "CONTINUATION",
)
_H2_CONNECTION_FRAMES = {"SETTINGS", "PING", "GOAWAY"}  # stream 0 only
_H2_FIXED_LENGTHS = {"PRIORITY": 5, "RST_STREAM": 4, "PING": 8, "WINDOW_UPDATE": 4}
_H2_DEFAULT_MAX_FRAME = 16384


def describe_http(payload: bytes) -> dict[str, str | int] | None:
    """What a captured plaintext chunk is, when it starts an HTTP message; None when it does not.

    HTTP/1.x requests give method, path and host (the Host header, else an absolute target's host;
    absent when neither is there), responses give status and reason. HTTP/2 (the client's connection
    preface, or a run of well-formed frames) gives the first frame's stream that is not the
    connection's own (0 when there is none) and that frame's type; headers are HPACK-compressed and
    not decoded.
    """
    request = _HTTP1_REQUEST.match(payload)
    if request:
        method, target, version = request.groups()
        described: dict[str, str | int] = {
            "protocol": "http/" + version.decode(),
            "method": method.decode(),
            "path": target.decode(errors="replace"),
        }
        head = payload.split(b"\r\n\r\n", 1)[0]
        host = _HOST_HEADER.search(head, request.end()) or _ABSOLUTE_TARGET.match(target)
        if host:
            described["host"] = host.group(1).decode(errors="replace")
        return described
    response = _HTTP1_RESPONSE.match(payload)
    if response:
        version, status, reason = response.groups()
        return {
            "protocol": "http/" + version.decode(),
            "status": int(status),
            "reason": (reason or b"").decode(errors="replace"),
        }
    return _describe_h2(payload)


def _describe_h2(payload: bytes) -> dict[str, str | int] | None:
    preface = payload.startswith(H2_PREFACE)
    position = len(H2_PREFACE) if preface else 0
    frames: list[tuple[str, int]] = []
    while position + 9 <= len(payload):
        length = int.from_bytes(payload[position : position + 3], "big")
        kind = payload[position + 3]
        stream = int.from_bytes(payload[position + 5 : position + 9], "big")
        if not _h2_frame_is_plausible(length, kind, stream):
            if preface:
                break
            return None  # without the preface, anything that is not a frame means this is not HTTP/2
        frames.append((_H2_FRAMES[kind], stream))
        position += 9 + length  # the last frame may run past what was captured
    if not frames:
        return {"protocol": "h2", "stream": 0} if preface else None
    name, stream = next(((name, stream) for name, stream in frames if stream != 0), frames[0])
    return {"protocol": "h2", "stream": stream, "frame": name}


def _h2_frame_is_plausible(length: int, kind: int, stream: int) -> bool:
    if kind >= len(_H2_FRAMES) or stream >> 31 or length > _H2_DEFAULT_MAX_FRAME:
        return False
    name = _H2_FRAMES[kind]
    if name in _H2_CONNECTION_FRAMES:
        if stream != 0:
            return False
    elif name != "WINDOW_UPDATE" and stream == 0:
        return False
    if name == "SETTINGS" and length % 6:
        return False
    return _H2_FIXED_LENGTHS.get(name, length) == length


# ---- the capture -------------------------------------------------------------------------------------


def _kernel_path(path: Path) -> Path:
    """The path to give the kernel: symlinks resolved, except for /proc/<pid>/map_files and /proc/<pid>/root
    links, which lead to the right file only when the kernel itself follows them."""
    return path if path.parts[:2] == ("/", "proc") else path.resolve()


def uprobe_multi_supported(release: str | None = None) -> bool:
    """Whether this kernel has uprobe_multi links (6.6+); older ones get perf-event uprobes."""
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (6, 6)


@dataclass
class _Attachment:
    path: Path
    links: list[libbpf.Link | libbpf.FdLink]


class TlsCapture:
    """The loaded programs and maps, with uprobes on the libraries given to attach_library().

    Attachments are bpf_links owned by this process: they go away with close() or when it exits.
    One reader polls the events.
    """

    def __init__(self, payload_bytes: int = 0, pidns: tuple[int, int] | None = None) -> None:
        """`payload_bytes`: plaintext bytes kept per call, 0 (sizes only) to MAX_PAYLOAD_BYTES.
        `pidns`: (st_dev, st_ino) of the sandbox's /proc/<pid>/ns/pid, to report its pids."""
        if not 0 <= payload_bytes <= MAX_PAYLOAD_BYTES:
            raise TlsCaptureError(f"payload_bytes must be between 0 and {MAX_PAYLOAD_BYTES}, not {payload_bytes}")
        names = [program for _, program in _PROBES] + [_RETURN_PROGRAM]
        # uprobe_multi links need only CAP_BPF and CAP_PERFMON, where perf-event uprobes need
        # CAP_SYS_ADMIN on recent kernels (measured on 6.18), which the host agent does not have.
        self.multi = uprobe_multi_supported()
        attach_types = dict.fromkeys(names, libbpf.BPF_TRACE_UPROBE_MULTI) if self.multi else None
        try:
            self._object = libbpf.BpfObject(compiled_object(SOURCE), attach_types=attach_types)
        except (OSError, ObjectError) as exc:
            raise TlsCaptureError(f"loading {SOURCE.name}: {exc}") from exc
        self.payload_bytes = payload_bytes
        self._clock_offset_ns = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self._events: list[TlsEvent] = []
        try:
            self._maps = {name: self._object.map(name) for name in ("config", "targets", "exempt", "counters", "events")}
            self._programs = {name: self._object.program(name) for name in names}
            config = _CONFIG.pack(payload_bytes, 0, kernel_dev(pidns[0]) if pidns else 0, pidns[1] if pidns else 0)
            self._maps["config"].update(struct.pack("=I", 0), config)
            self._ring = libbpf.RingBuffer(
                self._maps["events"], lambda raw: self._events.append(parse_event(raw, self._clock_offset_ns))
            )
        except OSError as exc:
            self._object.close()
            raise TlsCaptureError(f"setting up {SOURCE.name}: {exc}") from exc
        self._peer_links: list[libbpf.Link] = []
        self.peers_unknown: str | None = None  # why peers cannot be named, when they cannot
        try:
            for name in _PEER_PROGRAMS:
                self._peer_links.append(self._object.program(name).attach())
        except OSError as exc:  # kernels before 6.3 lack the tracepoints: capture still works, unnamed
            for link in self._peer_links:
                link.destroy()
            self._peer_links = []
            self.peers_unknown = f"peers are not named on this kernel: {exc}"
        self._attachments: dict[tuple[int, int], _Attachment] = {}
        self._peers: OrderedDict[tuple[int, int], tuple[str, int]] = OrderedDict()

    def __enter__(self) -> TlsCapture:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- targets --------------------------------------------------------------------------------------
    def add_target(self, cgroup_dir: Path) -> None:
        """Capture the tasks in this cgroup v2 directory and below it (except under an exempt one)."""
        self._edit("targets", cgroup_dir, add=True)

    def remove_target(self, cgroup_dir: Path) -> bool:
        """Stop capturing there; False when it was not a target, or the directory is gone (then nothing
        runs there any more, and its id is never given to another cgroup)."""
        return self._edit("targets", cgroup_dir, add=False)

    def add_exempt(self, cgroup_dir: Path) -> None:
        """Never capture the tasks in this cgroup or below it, even under a target (a machine's services)."""
        self._edit("exempt", cgroup_dir, add=True)

    def _edit(self, map_name: str, cgroup_dir: Path, *, add: bool) -> bool:
        what = "capture target" if map_name == "targets" else "capture exemption"
        try:
            key = struct.pack("=Q", cgroup_id(cgroup_dir))
            if add:
                self._maps[map_name].update(key, b"\x01")
                return True
            return self._maps[map_name].delete(key)
        except OSError as exc:
            if not add and exc.errno == errno.ENOENT:
                return False
            raise TlsCaptureError(f"{'adding' if add else 'removing'} {what} {cgroup_dir}: {exc}") from exc

    # ---- libraries ------------------------------------------------------------------------------------
    def attach_library(self, path: Path) -> bool:
        """Put the probes on one libssl; False when that file (by device and inode) already has them,
        whatever path it was reached by, since a second set would report every call twice."""
        try:
            identity = os.stat(path)
        except OSError as exc:
            raise TlsCaptureError(f"attaching to {path}: {exc}") from exc
        key = (identity.st_dev, identity.st_ino)
        if key in self._attachments:
            return False
        target = _kernel_path(path)
        try:
            offsets = function_offsets(target, (function for function, _ in _PROBES))
        except (OSError, struct.error, IndexError, ValueError) as exc:
            raise TlsCaptureError(f"reading the symbols of {target}: {exc}") from exc
        if not offsets:
            raise TlsCaptureError(f"{target} exports none of {', '.join(f for f, _ in _PROBES)}: not an OpenSSL libssl")
        links: list[libbpf.Link | libbpf.FdLink] = []
        returns = self._programs[_RETURN_PROGRAM]
        try:
            for function, program in _PROBES:
                if function not in offsets:
                    continue
                offset = offsets[function]
                if self.multi:
                    links.append(self._programs[program].attach_uprobe_multi(target, [offset], retprobe=False))
                else:
                    links.append(self._programs[program].attach_uprobe(target, offset, retprobe=False))
                    links.append(returns.attach_uprobe(target, offset, retprobe=True))
            if self.multi:
                links.append(returns.attach_uprobe_multi(target, list(offsets.values()), retprobe=True))
        except OSError as error:
            for link in links:
                link.destroy()
            raise TlsCaptureError(str(error)) from error
        except BaseException:
            for link in links:
                link.destroy()
            raise
        self._attachments[key] = _Attachment(target, links)
        return True

    def libraries(self) -> list[Path]:
        """The libraries with probes, one path per file."""
        return [attachment.path for attachment in self._attachments.values()]

    # ---- reading --------------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> list[TlsEvent]:
        """Wait up to `timeout_ms` for events and return all that are ready (oldest first)."""
        self._ring.poll(timeout_ms)
        ready, self._events = self._events, []
        return [self._with_peer(event) for event in ready]

    def _with_peer(self, event: TlsEvent) -> TlsEvent:
        """Name the peer of a call that made no TCP call from the connection's earlier calls."""
        key = (event.pid, event.connection)
        if event.peer is not None:
            self._peers[key] = event.peer
            self._peers.move_to_end(key)
            while len(self._peers) > _PEERS_REMEMBERED:
                self._peers.popitem(last=False)
            return event
        known = self._peers.get(key)
        return replace(event, peer=known) if known is not None else event

    def counters(self) -> dict[str, int]:
        """Since load, summed over CPUs: events captured, events lost to a full ring buffer, and events
        sent without payload because the buffer could not be read."""
        return self._maps["counters"].u64_totals(COUNTERS)

    def close(self) -> None:
        """Detach every probe and release the programs and maps; idempotent."""
        attachments, self._attachments = self._attachments, {}
        for attachment in attachments.values():
            for link in attachment.links:
                link.destroy()
        for link in self._peer_links:
            link.destroy()
        self._peer_links = []
        self._ring.close()
        self._object.close()
