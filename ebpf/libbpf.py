"""A small ctypes binding to libbpf (`libbpf.so.1`, Debian's libbpf1): open and load a compiled BPF
object, attach its programs to cgroups, edit its maps and read its ring buffer.

Why libbpf and not BCC here: BCC compiles the program with clang inside the daemon on every start
(0.4 s even for an empty program, 0.8 s for the gate, about 100 MB of LLVM in memory), which is most of
a local sandbox's create time. The gate reads only uapi structures, so it can be compiled once, ahead of
time, and loaded in milliseconds. libbpf is the kernel's own loader library and is already present
wherever BCC is (libbcc depends on it).

Only what the gate uses is bound. libbpf 1.x returns negative errno values (and NULL with errno set
for pointers); every failure here becomes an `OSError` naming the operation, plus what libbpf printed
(the verifier's log, for a program the kernel refused).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("km.ebpf")
_LIBRARY_NAME = "libbpf.so.1"
_PRINT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_RING_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_LIBBPF_WARN = 0
_KEPT_LINES = 200

BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type, kernel 6.6+
_BPF_F_UPROBE_MULTI_RETURN = 1
_BPF_LINK_CREATE = 28
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
# union bpf_attr for BPF_LINK_CREATE with uprobe_multi: prog_fd, target_fd, attach_type, flags, then
# path, offsets, ref_ctr_offsets, cookies (pointers), cnt, flags, pid; padded to 64 bytes.
_UPROBE_MULTI_ATTR = struct.Struct("=IIIIQQQQIII4x")


class LibbpfError(OSError):
    """A libbpf call failed; `str()` has the operation, the errno text and libbpf's own messages."""


class _Messages:
    """What libbpf printed lately (warnings and the verifier log), to put into error messages."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._lines.extend(line for line in text.splitlines() if line.strip())
            del self._lines[:-_KEPT_LINES]

    def take(self) -> list[str]:
        with self._lock:
            lines, self._lines = self._lines, []
        return lines


_messages = _Messages()
_lib: Any = None
_print_hook: Any = None  # kept referenced: libbpf holds the C pointer


def _on_print(level: int, template: bytes | None, arguments: int | None) -> int:
    """libbpf's printer: format with libc's vsnprintf (x86-64 passes the va_list as a pointer)."""
    if not template or level != _LIBBPF_WARN:
        return 0
    buffer = ctypes.create_string_buffer(4096)
    try:
        _libc().vsnprintf(buffer, len(buffer), template, arguments)
        text = buffer.value
    except (OSError, AttributeError):
        text = template
    _messages.add(text.decode(errors="replace"))
    return 0


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.vsnprintf.restype = ctypes.c_int
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    libc.syscall.restype = ctypes.c_long
    return libc


def library() -> Any:
    """libbpf with the signatures used here; loaded once. Raises LibbpfError when it is not installed."""
    global _lib, _print_hook
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL(_LIBRARY_NAME, use_errno=True)
    except OSError as exc:
        raise LibbpfError(errno.ENOENT, f"{_LIBRARY_NAME} not found: install Debian's libbpf1 ({exc})") from exc
    void_p, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (void_p, [_PRINT_CALLBACK]),
        "bpf_object__open_file": (void_p, [c_char_p, void_p]),
        "bpf_object__load": (c_int, [void_p]),
        "bpf_object__close": (None, [void_p]),
        "bpf_object__find_program_by_name": (void_p, [void_p, c_char_p]),
        "bpf_object__find_map_by_name": (void_p, [void_p, c_char_p]),
        "bpf_program__fd": (c_int, [void_p]),
        "bpf_program__expected_attach_type": (c_int, [void_p]),
        "bpf_program__set_expected_attach_type": (c_int, [void_p, c_int]),
        "bpf_map__fd": (c_int, [void_p]),
        "bpf_map__key_size": (ctypes.c_uint32, [void_p]),
        "bpf_map__value_size": (ctypes.c_uint32, [void_p]),
        "bpf_map__type": (c_int, [void_p]),
        "bpf_map__set_pin_path": (c_int, [void_p, c_char_p]),
        "bpf_map_update_elem": (c_int, [c_int, void_p, void_p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, void_p, void_p]),
        "bpf_map_delete_elem": (c_int, [c_int, void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, void_p, void_p]),
        "bpf_prog_attach": (c_int, [c_int, c_int, c_int, ctypes.c_uint]),
        "bpf_program__attach_uprobe": (void_p, [void_p, ctypes.c_bool, c_int, c_char_p, ctypes.c_size_t]),
        "bpf_program__attach": (void_p, [void_p]),
        "bpf_link__destroy": (c_int, [void_p]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
        "libbpf_num_possible_cpus": (c_int, []),
        "ring_buffer__new": (void_p, [c_int, _RING_CALLBACK, void_p, void_p]),
        "ring_buffer__poll": (c_int, [void_p, c_int]),
        "ring_buffer__free": (None, [void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    _print_hook = _PRINT_CALLBACK(_on_print)
    lib.libbpf_set_print(_print_hook)
    _lib = lib
    return lib


def _failure(operation: str, code: int) -> LibbpfError:
    """An error for a libbpf return value (negative errno) with whatever libbpf printed meanwhile."""
    number = abs(code) or ctypes.get_errno() or errno.EIO
    printed = _messages.take()
    detail = f": {' | '.join(printed[-8:])}" if printed else ""
    return LibbpfError(number, f"{operation}: {os.strerror(number)}{detail}")


def _check(operation: str, code: int) -> int:
    if code < 0:
        raise _failure(operation, code)
    return code


class Map:
    """One of a loaded object's maps, edited through its file descriptor with raw key/value bytes."""

    PERCPU_TYPES = frozenset({5, 6, 10})  # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

    def __init__(self, name: str, handle: int) -> None:
        lib = library()
        self.name = name
        self.fd: int = lib.bpf_map__fd(handle)
        self.key_size: int = lib.bpf_map__key_size(handle)
        self.value_size: int = lib.bpf_map__value_size(handle)
        self._per_cpu = lib.bpf_map__type(handle) in self.PERCPU_TYPES
        # A per-CPU lookup fills one 8-byte-aligned slot per possible CPU.
        self._cpus = _check("libbpf_num_possible_cpus", lib.libbpf_num_possible_cpus()) if self._per_cpu else 1
        self._slot = (self.value_size + 7) // 8 * 8 if self._per_cpu else self.value_size

    def update(self, key: bytes, value: bytes) -> None:
        _check(f"updating map {self.name}", library().bpf_map_update_elem(self.fd, self._key(key), value, 0))

    def lookup(self, key: bytes) -> bytes | None:
        buffer = ctypes.create_string_buffer(self._slot * self._cpus)
        code = library().bpf_map_lookup_elem(self.fd, self._key(key), buffer)
        if code == -errno.ENOENT:
            return None
        _check(f"reading map {self.name}", code)
        return buffer.raw

    def lookup_per_cpu(self, key: bytes) -> list[bytes]:
        """A per-CPU map's value on every possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[index * self._slot : index * self._slot + self.value_size] for index in range(self._cpus)]

    def u64_totals(self, names: Sequence[str]) -> dict[str, int]:
        """A per-CPU array of u64 counters, slot i named names[i], each summed over every CPU."""
        totals: dict[str, int] = {}
        for index, name in enumerate(names):
            per_cpu = self.lookup_per_cpu(struct.pack("=I", index))
            totals[name] = sum(struct.unpack("=Q", value)[0] for value in per_cpu)
        return totals

    def delete(self, key: bytes) -> bool:
        """Whether there was an entry to delete."""
        code = library().bpf_map_delete_elem(self.fd, self._key(key))
        if code == -errno.ENOENT:
            return False
        _check(f"deleting from map {self.name}", code)
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, as a snapshot taken before yielding (so callers may delete while iterating)."""
        lib = library()
        found: list[bytes] = []
        current: Any = None
        following = ctypes.create_string_buffer(self.key_size)
        while True:
            code = lib.bpf_map_get_next_key(self.fd, current, following)
            if code == -errno.ENOENT:
                break
            _check(f"listing map {self.name}", code)
            found.append(following.raw)
            current = ctypes.create_string_buffer(following.raw, self.key_size)
        yield from found

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name} has {self.key_size}-byte keys, got {len(key)} bytes")
        return key


class Link:
    """A bpf_link made by libbpf: the attachment lasts until destroy() or until this process exits."""

    def __init__(self, handle: int, description: str) -> None:
        self._handle: int | None = handle
        self.description = description

    def destroy(self) -> None:
        if self._handle is not None:
            library().bpf_link__destroy(self._handle)
            self._handle = None


class FdLink:
    """A bpf_link made by a raw BPF_LINK_CREATE (what libbpf 1.1 cannot make): its file descriptor is
    the attachment, so closing it detaches."""

    def __init__(self, fd: int, description: str) -> None:
        self._fd: int | None = fd
        self.description = description

    def destroy(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _bpf_syscall(command: int, attr: bytes) -> int:
    """bpf(2) itself, for commands libbpf 1.1 has no wrapper for; raises OSError with the errno."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr, len(attr))
    result: int = _libc().syscall(ctypes.c_long(number), ctypes.c_int(command), buffer, ctypes.c_uint(len(attr)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Program:
    def __init__(self, name: str, handle: int) -> None:
        lib = library()
        self.name = name
        self._handle = handle
        self.fd: int = lib.bpf_program__fd(handle)
        self.attach_type: int = lib.bpf_program__expected_attach_type(handle)

    def attach_uprobe(self, binary: Path, offset: int, *, retprobe: bool, pid: int = -1) -> Link:
        """Attach at `offset` (a file offset) in `binary`, for process `pid` (-1: every process)."""
        kind = "uretprobe" if retprobe else "uprobe"
        description = f"{self.name} as a {kind} at {binary}+{offset:#x}"
        handle = library().bpf_program__attach_uprobe(self._handle, retprobe, pid, os.fsencode(binary), offset)
        if not handle:
            raise _failure(f"attaching {description}", -ctypes.get_errno())
        return Link(handle, description)

    def attach(self) -> Link:
        """Attach where the program's section says (`raw_tracepoint/<name>` and the like)."""
        description = f"{self.name} where its section names"
        handle = library().bpf_program__attach(self._handle)
        if not handle:
            raise _failure(f"attaching {description}", -ctypes.get_errno())
        return Link(handle, description)

    def attach_uprobe_multi(self, binary: Path, offsets: Sequence[int], *, retprobe: bool) -> FdLink:
        """Attach at every file offset in `offsets` of `binary`, for every process, with one
        uprobe_multi link (kernel 6.6+). Unlike a perf-event uprobe, which some kernels reserve to
        CAP_SYS_ADMIN, it needs only what loading the program needed (CAP_BPF and CAP_PERFMON). The
        program must have been loaded with BPF_TRACE_UPROBE_MULTI as its expected attach type."""
        kind = "uretprobe" if retprobe else "uprobe"
        description = f"{self.name} as a multi-{kind} at {binary}+{','.join(f'{o:#x}' for o in offsets)}"
        path = ctypes.create_string_buffer(os.fsencode(binary))
        table = (ctypes.c_uint64 * len(offsets))(*offsets)
        attr = _UPROBE_MULTI_ATTR.pack(
            self.fd, 0, BPF_TRACE_UPROBE_MULTI, 0,
            ctypes.addressof(path), ctypes.addressof(table), 0, 0,
            len(offsets), _BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, 0,
        )  # fmt: skip
        try:
            return FdLink(_bpf_syscall(_BPF_LINK_CREATE, attr), description)
        except OSError as exc:
            raise LibbpfError(exc.errno or errno.EIO, f"attaching {description}: {exc.strerror}") from exc


class BpfObject:
    """A compiled object loaded into the kernel: its programs verified, its maps created.

    Programs and maps live as long as this object (or, for programs attached the legacy way, as long
    as they are attached); close() releases this process's references.
    """

    def __init__(
        self, path: Path, pinned: Mapping[str, Path] | None = None, attach_types: Mapping[str, int] | None = None
    ) -> None:
        """`pinned` maps map names to files on a bpffs: a map already pinned there is reused (with its
        entries) instead of created, and a new one is pinned there, so the next loader finds it.
        `attach_types` overrides programs' expected attach types, which their section names set (libbpf
        1.1 knows no section for some, such as BPF_TRACE_UPROBE_MULTI)."""
        lib = library()
        _messages.take()
        handle = lib.bpf_object__open_file(str(path).encode(), None)
        if not handle:
            raise _failure(f"opening BPF object {path}", -ctypes.get_errno())
        try:
            for name, pin in (pinned or {}).items():
                found = lib.bpf_object__find_map_by_name(handle, name.encode())
                if not found:
                    raise LibbpfError(errno.ENOENT, f"no map {name} in {path.name} to pin")
                _check(f"setting the pin path of map {name}", lib.bpf_map__set_pin_path(found, str(pin).encode()))
            for name, attach_type in (attach_types or {}).items():
                program = lib.bpf_object__find_program_by_name(handle, name.encode())
                if not program:
                    raise LibbpfError(errno.ENOENT, f"no program {name} in {path.name}")
                _check(
                    f"setting the attach type of program {name}",
                    lib.bpf_program__set_expected_attach_type(program, attach_type),
                )
            _check(f"loading BPF object {path.name} into the kernel", lib.bpf_object__load(handle))
        except BaseException:
            lib.bpf_object__close(handle)
            raise
        self._handle: int | None = handle
        self.path = path

    def program(self, name: str) -> Program:
        handle = library().bpf_object__find_program_by_name(self._require(), name.encode())
        if not handle:
            raise LibbpfError(errno.ENOENT, f"no program {name} in {self.path.name}")
        return Program(name, handle)

    def map(self, name: str) -> Map:
        handle = library().bpf_object__find_map_by_name(self._require(), name.encode())
        if not handle:
            raise LibbpfError(errno.ENOENT, f"no map {name} in {self.path.name}")
        return Map(name, handle)

    def close(self) -> None:
        if self._handle is not None:
            library().bpf_object__close(self._handle)
            self._handle = None

    def _require(self) -> int:
        if self._handle is None:
            raise LibbpfError(errno.EBADF, f"BPF object {self.path.name} is closed")
        return self._handle


def attach_to_cgroup(program: Program, cgroup_fd: int, flags: int = 0) -> None:
    """Legacy BPF_PROG_ATTACH: the program stays attached after this process exits."""
    _check(f"attaching {program.name}", library().bpf_prog_attach(program.fd, cgroup_fd, program.attach_type, flags))


def detach_from_cgroup(program: Program, cgroup_fd: int) -> bool:
    """Detach whatever program of this program's attach type is there; False when there was none."""
    code = library().bpf_prog_detach2(program.fd, cgroup_fd, program.attach_type)
    if code == -errno.ENOENT:
        return False
    _check(f"detaching {program.name}", code)
    return True


class RingBuffer:
    """Reads a BPF_MAP_TYPE_RINGBUF map; `on_record` gets each record's bytes in poll()'s thread."""

    def __init__(self, ring: Map, on_record: Callable[[bytes], None]) -> None:
        def deliver(_context: int | None, data: int | None, size: int) -> int:
            if data is None:
                return 0
            try:
                on_record(ctypes.string_at(data, size))
            except Exception:  # an exception cannot cross back into C; lose this record, not the reader
                log.exception("a ring buffer record could not be handled")
            return 0

        self._callback = _RING_CALLBACK(deliver)  # kept referenced while libbpf holds it
        handle = library().ring_buffer__new(ring.fd, self._callback, None, None)
        if not handle:
            raise _failure(f"opening ring buffer {ring.name}", -ctypes.get_errno())
        self._handle: int | None = handle

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms, deliver what is ready; returns how many records were delivered."""
        if self._handle is None:
            return 0
        code = library().ring_buffer__poll(self._handle, timeout_ms)
        if code == -errno.EINTR:
            return 0
        return _check("polling the ring buffer", code)

    def close(self) -> None:
        if self._handle is not None:
            library().ring_buffer__free(self._handle)
            self._handle = None
