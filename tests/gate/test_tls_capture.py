"""TLS plaintext capture: real uprobes on the system libssl, real cgroups, a TLS server on 127.0.0.1.

Clients (python `ssl`, curl, `openssl s_client`) run in a cgroup v2 directory made for the test; the
capture targets it, and clients elsewhere must not show up. Traffic only goes to 127.0.0.1. The pure
parts (HTTP description, ELF symbols, record layout, /proc maps) are tested without root.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ebpf.tls_capture import (
    H2_PREFACE,
    MAX_PAYLOAD_BYTES,
    TlsCapture,
    TlsCaptureError,
    TlsEvent,
    describe_http,
    function_offsets,
    libraries_in_use,
    parse_event,
    ssl_mappings,
    uprobe_multi_supported,
)
from tests.conftest import REPO_ROOT
from tests.gate.conftest import GateCgroup, cgroup2_mount, in_cgroup, start_server, stop

HERE = Path(__file__).resolve().parent
LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
SSL_FUNCTIONS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")
root = pytest.mark.root
needs_libssl = pytest.mark.skipif(not LIBSSL.exists(), reason=f"needs OpenSSL 3 at {LIBSSL}")


def request_text(path: str, marker: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: example.test\r\nX-Marker: {marker}\r\nConnection: close\r\n\r\n"


# ---- pure: HTTP --------------------------------------------------------------------------------------


def h2_frame(kind: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("payload", "described"),
    [
        (
            b"GET /v1/messages?beta=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n",
            {"protocol": "http/1.1", "method": "GET", "path": "/v1/messages?beta=1", "host": "api.example.com"},
        ),
        (
            b"POST /upload HTTP/1.0\r\nhOsT:  files.example.com:8443 \r\nContent-Length: 3\r\n\r\nabc",
            {"protocol": "http/1.0", "method": "POST", "path": "/upload", "host": "files.example.com:8443"},
        ),
        (
            b"GET http://proxy.example.com/x HTTP/1.1\r\nAccept: */*\r\n\r\n",
            {"protocol": "http/1.1", "method": "GET", "path": "http://proxy.example.com/x", "host": "proxy.example.com"},
        ),
        (b"DELETE /item/7 HTTP/1.1\r\n", {"protocol": "http/1.1", "method": "DELETE", "path": "/item/7"}),
        (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            {"protocol": "http/1.1", "status": 404, "reason": "Not Found"},
        ),
        (b"HTTP/1.1 204\r\n\r\n", {"protocol": "http/1.1", "status": 204, "reason": ""}),
        (
            H2_PREFACE + h2_frame(4, 0, bytes(12)) + h2_frame(8, 0, bytes(4)) + h2_frame(1, 1, b"\x82\x84\x87", 4),
            {"protocol": "h2", "stream": 1, "frame": "HEADERS"},
        ),
        (H2_PREFACE + h2_frame(4, 0, bytes(18)), {"protocol": "h2", "stream": 0, "frame": "SETTINGS"}),
        (H2_PREFACE, {"protocol": "h2", "stream": 0}),
        (h2_frame(1, 3, b"\x82\x86\x84", 5), {"protocol": "h2", "stream": 3, "frame": "HEADERS"}),
        # a DATA frame cut short by the capture limit
        (h2_frame(0, 5, b"x" * 1000)[:300], {"protocol": "h2", "stream": 5, "frame": "DATA"}),
        (h2_frame(4, 0, b"", 1), {"protocol": "h2", "stream": 0, "frame": "SETTINGS"}),
    ],
)
def test_describe_http_names_what_a_chunk_starts(payload: bytes, described: dict[str, Any]) -> None:
    assert describe_http(payload) == described


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"GET",
        b"get / HTTP/1.1\r\n",  # methods are upper case
        b"GET / HTTP/2.0\r\n",
        b"HTTP/1.1 200 OK",  # no line end yet: not sure it is a status line
        b"hello world, this is not http\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
        h2_frame(4, 1, bytes(6)),  # SETTINGS on a stream
        h2_frame(1, 0, b"\x82"),  # HEADERS on the connection
        h2_frame(6, 0, bytes(4)),  # PING of the wrong length
        h2_frame(1, 1, b"\x82") + b"\xff" * 9,  # a frame followed by something that is not one
        bytes(range(256)),
    ],
)
def test_describe_http_refuses_what_is_not_http(payload: bytes) -> None:
    assert describe_http(payload) is None


# ---- pure: ELF symbols, record layout, maps ----------------------------------------------------------


def load_segments(library: Path) -> list[tuple[int, int, int]]:
    """(vaddr, filesz, offset) of each LOAD segment, as readelf reports them."""
    output = subprocess.run(["readelf", "-lW", str(library)], capture_output=True, text=True, check=True).stdout
    segments = []
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            segments.append((int(fields[2], 16), int(fields[4], 16), int(fields[1], 16)))
    return segments


@needs_libssl
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="needs binutils")
def test_function_offsets_match_what_nm_and_readelf_report() -> None:
    nm = subprocess.run(["nm", "-D", "--defined-only", str(LIBSSL)], capture_output=True, text=True, check=True).stdout
    addresses = {}
    for line in nm.splitlines():
        value, kind, name = line.split()
        addresses[name.split("@")[0]] = (int(value, 16), kind)
    segments = load_segments(LIBSSL)

    offsets = function_offsets(LIBSSL, [*SSL_FUNCTIONS, "SSL_no_such_function"])

    assert set(offsets) == set(SSL_FUNCTIONS)
    for name in SSL_FUNCTIONS:
        address, kind = addresses[name]
        assert kind == "T"
        vaddr, filesz, offset = next(s for s in segments if s[0] <= address < s[0] + s[1])
        assert offsets[name] == address - vaddr + offset, name
    readelf = subprocess.run(["readelf", "-Ws", "--dyn-syms", str(LIBSSL)], capture_output=True, text=True, check=True).stdout
    listed = re.search(r"^\s*\d+: ([0-9a-f]+)\s+\d+ FUNC\s+GLOBAL\s+DEFAULT\s+\d+ SSL_write@", readelf, re.MULTILINE)
    assert listed is not None and int(listed.group(1), 16) == addresses["SSL_write"][0]


def test_function_offsets_refuse_a_file_that_is_not_elf(tmp_path: Path) -> None:
    text = tmp_path / "libssl.so.3"
    text.write_text("not a library")
    with pytest.raises(TlsCaptureError, match="not a 64-bit ELF"):
        function_offsets(text, ["SSL_write"])


EVENT_HEADER = "=QQIIIIIB3x16sHH16s"


def test_parse_event_reads_the_header_and_only_the_captured_payload() -> None:
    peer = socket.AF_INET, socket.htons(443), bytes([10, 0, 0, 7]) + bytes(12)
    header = struct.pack(EVENT_HEADER, 5_000_000_000, 0xABC, 42, 43, 1000, 9000, 5, 1, b"curl\0junk", *peer)
    event = parse_event(header + b"HTTP/and more bytes than captured", clock_offset_ns=1_000_000_000)

    assert event == TlsEvent(
        time=6.0,
        pid=42,
        uid=1000,
        comm="curl",
        direction="read",
        size=9000,
        payload=b"HTTP/",
        tid=43,
        connection=0xABC,
        peer=("10.0.0.7", 443),
    )


@pytest.mark.parametrize(
    ("family", "address", "peer"),
    [
        (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "fd00::5"), ("fd00::5", 8443)),
        (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3"), ("10.1.2.3", 8443)),
        (0, bytes(16), None),  # the call made no TCP call, so its peer is unknown here
    ],
)
def test_parse_event_names_the_peer_in_each_family(family: int, address: bytes, peer: tuple[str, int] | None) -> None:
    header = struct.pack(EVENT_HEADER, 1, 2, 3, 4, 5, 6, 0, 0, b"python3", family, socket.htons(8443), address)

    assert parse_event(header).peer == peer


def test_ssl_mappings_name_each_libssl_once_with_a_range_that_maps_it() -> None:
    maps = "\n".join(
        [
            "7f0000000000-7f0000001000 r--p 00000000 fe:00 5595301    /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "7f0000001000-7f0000002000 r-xp 00001000 fe:00 5595301    /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "7f0000003000-7f0000004000 r--p 00000000 fe:00 5595302    /opt/app/lib/libssl.so.1.1",
            "7f0000005000-7f0000006000 r--p 00000000 fe:00 5595303    /usr/lib/x86_64-linux-gnu/libssl3.so",
            "7f0000007000-7f0000008000 r--p 00000000 fe:00 5595304    /old/libssl.so.3 (deleted)",
            "7f0000009000-7f000000a000 r--p 00000000 fe:00 5595305    /usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0          [stack]",
            "7ffc00030000-7ffc00031000 rw-p 00000000 00:00 0",
        ]
    )
    assert ssl_mappings(maps) == {
        "/usr/lib/x86_64-linux-gnu/libssl.so.3": "7f0000000000-7f0000001000",
        "/opt/app/lib/libssl.so.1.1": "7f0000003000-7f0000004000",
        "/old/libssl.so.3": "7f0000007000-7f0000008000",
    }


@pytest.mark.parametrize(
    ("release", "supported"), [("6.18.44-fc-v657", True), ("6.6.0", True), ("6.1.0-28-cloud-amd64", False), ("5.15", False)]
)
def test_uprobe_multi_is_used_from_kernel_6_6(release: str, supported: bool) -> None:
    assert uprobe_multi_supported(release) is supported


@pytest.mark.parametrize("payload_bytes", [-1, MAX_PAYLOAD_BYTES + 1])
def test_payload_bytes_outside_the_supported_range_are_refused(payload_bytes: int) -> None:
    with pytest.raises(TlsCaptureError, match="payload_bytes"):
        TlsCapture(payload_bytes=payload_bytes)


# ---- harness for the real probes ---------------------------------------------------------------------


class Client:
    """A python `ssl` client (tests/gate/tls_client.py) that joins `cgroup` (None: stays outside) first."""

    def __init__(self, cgroup: Path | None, prefix: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [*prefix, sys.executable, str(HERE / "tls_client.py"), str(cgroup) if cgroup else "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._read()
        self.pid: int = hello["pid"]
        self.pidns: tuple[int, int] = (hello["pidns"][0], hello["pidns"][1])

    def _read(self, timeout: float = 60) -> dict[str, Any]:
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the client did not answer")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client exited with {self.process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def do(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        assert reply["ok"], reply
        return reply

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def cgroup(request: pytest.FixtureRequest) -> Iterator[GateCgroup]:
    made = GateCgroup(cgroup2_mount() / f"kmtls-test-{os.getpid()}-{request.node.name[:40]}")
    try:
        yield made
    finally:
        made.remove()


Spawn = Callable[..., Client]


@pytest.fixture
def spawn(cgroup: GateCgroup) -> Iterator[Spawn]:
    """Start clients (in the test's cgroup unless told otherwise, `outside=True` for none); all killed at the end."""
    clients: list[Client] = []

    def start(where: Path | None = None, *, outside: bool = False, prefix: tuple[str, ...] = ()) -> Client:
        client = Client(None if outside else where or cgroup.path, prefix)
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            client.stop()


MakeCapture = Callable[..., TlsCapture]


@pytest.fixture
def make_capture(cgroup: GateCgroup) -> Iterator[MakeCapture]:
    """A capture with its probes on the system libssl, targeting the test's cgroup; closed at the end."""
    made: list[TlsCapture] = []

    def make(payload_bytes: int | None = None, pidns: tuple[int, int] | None = None) -> TlsCapture:
        capture = TlsCapture(pidns=pidns) if payload_bytes is None else TlsCapture(payload_bytes, pidns)
        made.append(capture)
        assert capture.attach_library(LIBSSL)
        capture.add_target(cgroup.path)
        return capture

    try:
        yield make
    finally:
        for capture in made:
            capture.close()


def collect(capture: TlsCapture, done: Callable[[list[TlsEvent]], bool], timeout: float = 5) -> list[TlsEvent]:
    """Every event until `done` says the list is complete, plus whatever arrives in a short grace period
    (so that a test asserting "exactly one" would see a duplicate)."""
    events: list[TlsEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        if time.monotonic() > deadline:
            raise AssertionError(f"incomplete after {timeout}s: {events}")
        events.extend(capture.poll(100))
    events.extend(capture.poll(100))
    return events


def carrying(marker: str) -> Callable[[TlsEvent], bool]:
    return lambda event: marker.encode() in event.payload


def fdinfo_field(info: str, name: str) -> int:
    found = re.search(rf"^{name}:\s*(\d+)$", info, re.MULTILINE)
    assert found is not None, info
    return int(found.group(1))


def bpf_fds() -> dict[str, set[int]]:
    """This process's BPF objects by kind: prog and link ids, and the fds of the perf events it holds open."""
    held: dict[str, set[int]] = {"prog": set(), "link": set(), "perf_event": set()}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue
        if target == "anon_inode:bpf-prog":
            held["prog"].add(fdinfo_field(info, "prog_id"))
        elif target == "anon_inode:bpf_link":
            held["link"].add(fdinfo_field(info, "link_id"))
        elif target == "anon_inode:[perf_event]":
            held["perf_event"].add(int(name))
    return held


def kernel_links(program_ids: set[int]) -> list[dict[str, Any]]:
    """Every bpf_link in the kernel running one of these programs (bpftool's view, not this process's)."""
    listed = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [link for link in json.loads(listed or "[]") if link.get("prog_id") in program_ids]


def probe_links(capture: TlsCapture) -> int:
    """bpf_links of a capture with one libssl: uprobe_multi makes a link per entry program and one for all
    returns (perf uprobes: a pair per function); the peer programs add one each."""
    return (5 if capture.multi else 8) + (0 if capture.peers_unknown else 2)


def program_exists(program_id: int) -> bool:
    shown = subprocess.run(["bpftool", "prog", "show", "id", str(program_id)], capture_output=True, text=True)
    return shown.returncode == 0


# ---- real probes -------------------------------------------------------------------------------------


@root
@needs_libssl
def test_python_client_plaintext_is_captured_with_sizes_and_http_names(
    make_capture: MakeCapture, spawn: Spawn, port: int
) -> None:
    capture = make_capture(payload_bytes=MAX_PAYLOAD_BYTES)
    client = spawn()
    request = request_text("/probe?from=python", "hunter2-python")

    response = client.do("get", port=port, request=request)["response"]

    events = collect(
        capture, lambda found: any(e.direction == "read" for e in found) and any(carrying("hunter2")(e) for e in found)
    )
    writes = [event for event in events if event.direction == "write"]
    reads = [event for event in events if event.direction == "read"]
    assert [(w.payload, w.size) for w in writes] == [(request.encode(), len(request))]
    assert b"".join(r.payload for r in reads).decode() == response
    assert sum(r.size for r in reads) == len(response.encode())
    assert {(e.pid, e.comm, e.uid) for e in events} == {(client.process.pid, "kmtls-client", 0)}
    assert len({e.connection for e in events}) == 1
    assert {e.peer for e in events} == {("127.0.0.1", port)}  # the TCP connection under the TLS one
    assert abs(events[0].time - time.time()) < 30
    assert describe_http(writes[0].payload) == {
        "protocol": "http/1.1",
        "method": "GET",
        "path": "/probe?from=python",
        "host": "example.test",
    }
    assert describe_http(reads[0].payload) == {"protocol": "http/1.1", "status": 200, "reason": "OK"}
    counters = capture.counters()
    assert counters["captured"] == len(events) and counters["lost"] == 0 and counters["unreadable"] == 0


@root
@needs_libssl
def test_payload_is_off_by_default_and_sizes_are_still_reported(make_capture: MakeCapture, spawn: Spawn, port: int) -> None:
    capture = make_capture()
    request = request_text("/sizes-only", "not-copied")

    response = spawn().do("get", port=port, request=request)["response"]

    events = collect(capture, lambda found: sum(e.size for e in found) >= len(request) + len(response))
    assert [e.size for e in events if e.direction == "write"] == [len(request)]
    assert sum(e.size for e in events if e.direction == "read") == len(response.encode())
    assert all(e.payload == b"" for e in events)


@root
@needs_libssl
def test_only_the_target_cgroup_and_its_descendants_are_captured(
    make_capture: MakeCapture, spawn: Spawn, cgroup: GateCgroup, port: int
) -> None:
    """Two sandboxes share libssl's inode: the probe fires for both, the filter keeps the target's."""
    sandbox = cgroup.sub("sandbox")
    other_sandbox = cgroup.sub("other-sandbox")
    capture = make_capture(payload_bytes=256)
    capture.remove_target(cgroup.path)
    capture.add_target(sandbox)
    agent = spawn(cgroup.sub("sandbox", "agent"))  # a descendant of the target
    neighbour = spawn(other_sandbox)
    stranger = spawn(outside=True)

    neighbour.do("get", port=port, request=request_text("/", "neighbour-secret"))
    stranger.do("get", port=port, request=request_text("/", "stranger-secret"))
    agent.do("get", port=port, request=request_text("/", "agent-secret"))

    events = collect(
        capture, lambda found: any(map(carrying("agent-secret"), found)) and any(e.direction == "read" for e in found)
    )
    assert {e.pid for e in events} == {agent.process.pid}  # not the neighbours, nor the server's own SSL calls
    assert not any(carrying("neighbour-secret")(e) or carrying("stranger-secret")(e) for e in events)
    assert capture.remove_target(sandbox) is True
    assert capture.remove_target(sandbox) is False


@root
@needs_libssl
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_is_captured(make_capture: MakeCapture, cgroup: GateCgroup, port: int) -> None:
    capture = make_capture(payload_bytes=1024)
    curl = in_cgroup(
        cgroup.path, "curl", "-sk", "--http1.1", "-H", "X-Marker: curl-secret", f"https://127.0.0.1:{port}/from-curl"
    )

    finished = subprocess.run(curl, capture_output=True, text=True, timeout=30)

    assert finished.returncode == 0, finished.stderr
    events = collect(capture, lambda found: any(e.direction == "read" for e in found))
    write = next(e for e in events if e.direction == "write")
    assert write.comm == "curl" and b"X-Marker: curl-secret" in write.payload
    assert describe_http(write.payload) == {
        "protocol": "http/1.1",
        "method": "GET",
        "path": "/from-curl",
        "host": f"127.0.0.1:{port}",
    }
    read = next(e for e in events if e.direction == "read")
    assert describe_http(read.payload) == {"protocol": "http/1.1", "status": 200, "reason": "OK"}
    assert finished.stdout.encode() in b"".join(e.payload for e in events if e.direction == "read")


@root
@needs_libssl
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_an_http2_request_is_recognised_with_its_stream(
    make_capture: MakeCapture, cgroup: GateCgroup, certificate: tuple[Path, Path]
) -> None:
    capture = make_capture(payload_bytes=MAX_PAYLOAD_BYTES)
    server, h2_port = start_server(certificate, alpn="h2,http/1.1")
    try:
        # The server reads the preface and hangs up: only what curl sends matters here.
        subprocess.run(in_cgroup(cgroup.path, "curl", "-sk", "--http2", f"https://127.0.0.1:{h2_port}/h2"), timeout=30)
    finally:
        stop(server)

    events = collect(capture, lambda found: any(e.payload.startswith(H2_PREFACE) for e in found))
    described = [describe_http(e.payload) for e in events if e.direction == "write"]
    assert described[0] is not None and described[0]["protocol"] == "h2"
    assert {"protocol": "h2", "stream": 1, "frame": "HEADERS"} in described


@root
@needs_libssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_s_client_is_captured(make_capture: MakeCapture, cgroup: GateCgroup, port: int) -> None:
    capture = make_capture(payload_bytes=MAX_PAYLOAD_BYTES)
    request = request_text("/from-s-client", "s-client-secret")
    s_client = in_cgroup(cgroup.path, "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-ign_eof")

    finished = subprocess.run(s_client, input=request, capture_output=True, text=True, timeout=30)

    assert "hello from tls_server /from-s-client" in finished.stdout, finished.stderr
    events = collect(capture, lambda found: any(e.direction == "read" for e in found))
    assert {e.comm for e in events} == {"openssl"}
    written = b"".join(e.payload for e in events if e.direction == "write")
    assert written == request.encode()
    first_read = next(e for e in events if e.direction == "read")
    assert describe_http(first_read.payload) == {"protocol": "http/1.1", "status": 200, "reason": "OK"}


@root
@needs_libssl
def test_one_library_reached_by_several_paths_is_attached_once(
    make_capture: MakeCapture, spawn: Spawn, port: int, tmp_path: Path
) -> None:
    capture = make_capture(payload_bytes=128)
    symlink = tmp_path / "libssl-link.so.3"
    symlink.symlink_to(LIBSSL)
    bound = tmp_path / "libssl-bound.so.3"
    bound.touch()
    subprocess.run(["mount", "--bind", str(LIBSSL), str(bound)], check=True)
    try:
        assert capture.attach_library(symlink) is False
        assert capture.attach_library(bound) is False
        assert capture.attach_library(Path("/lib/x86_64-linux-gnu/libssl.so.3")) is False  # merged /usr
    finally:
        subprocess.run(["umount", str(bound)], check=True)
    assert capture.libraries() == [LIBSSL]
    assert len(bpf_fds()["link"]) == probe_links(capture)

    spawn().do("get", port=port, request=request_text("/once", "counted-once"))

    events = collect(capture, lambda found: any(e.direction == "read" for e in found))
    assert len([e for e in events if carrying("counted-once")(e)]) == 1


@root
def test_a_file_that_is_not_libssl_is_refused(make_capture: MakeCapture) -> None:
    capture = make_capture()
    with pytest.raises(TlsCaptureError, match="not an OpenSSL libssl"):
        capture.attach_library(Path(sys.executable).resolve())
    with pytest.raises(TlsCaptureError, match="No such file"):
        capture.attach_library(Path("/nonexistent/libssl.so.3"))
    assert capture.libraries() == [LIBSSL]


@root
@needs_libssl
def test_close_detaches_every_probe(spawn: Spawn, cgroup: GateCgroup, port: int) -> None:
    before = bpf_fds()
    capture = TlsCapture(payload_bytes=64)
    try:
        capture.attach_library(LIBSSL)
        capture.add_target(cgroup.path)
        attached = bpf_fds()
        programs = attached["prog"] - before["prog"]
        assert len(programs) == 7  # four entry programs, the shared return program, two peer programs
        links = probe_links(capture)
        assert len(attached["link"] - before["link"]) == links
        assert len(attached["perf_event"] - before["perf_event"]) == (0 if capture.multi else 8)
        assert len(kernel_links(programs)) == links
        client = spawn()
        client.do("get", port=port, request=request_text("/", "before-close"))
        assert collect(capture, lambda found: any(map(carrying("before-close"), found)))
    finally:
        capture.close()
        capture.close()  # idempotent

    after = bpf_fds()
    assert after["link"] == before["link"] and after["perf_event"] == before["perf_event"]
    assert after["prog"] == before["prog"]
    assert kernel_links(programs) == []
    # The kernel frees them (a uprobe_multi link's release waits for an RCU grace period): nothing of
    # the capture runs on SSL calls any more.
    deadline = time.monotonic() + 10
    while remaining := [program for program in programs if program_exists(program)]:
        assert time.monotonic() < deadline, f"programs {remaining} still loaded after close()"
        time.sleep(0.05)
    client.do("get", port=port, request=request_text("/", "after-close"))
    assert capture.poll(100) == []


@root
@needs_libssl
@pytest.mark.skipif(not uprobe_multi_supported(), reason="uprobe_multi links need kernel 6.6+")
def test_probes_attach_with_only_the_host_agents_capabilities(cgroup: GateCgroup, port: int) -> None:
    """The host agent runs without CAP_SYS_ADMIN, which perf-event uprobes need on recent kernels."""
    script = (
        "from pathlib import Path\n"
        "from ebpf.tls_capture import TlsCapture\n"
        "with TlsCapture() as capture:\n"
        f"    capture.attach_library(Path({str(LIBSSL)!r}))\n"
        f"    capture.add_target(Path({str(cgroup.path)!r}))\n"
        "    print(len(capture.libraries()), capture.multi, capture.peers_unknown is None)\n"
    )
    narrowed = ["setpriv", "--bounding-set", "-all,+bpf,+perfmon,+dac_override", "--inh-caps=-all"]
    finished = subprocess.run(
        [*narrowed, sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["1", "True", "True"]


@root
@needs_libssl
def test_a_ring_buffer_overrun_is_counted_not_silent(make_capture: MakeCapture, spawn: Spawn, port: int) -> None:
    capture = make_capture(payload_bytes=MAX_PAYLOAD_BYTES)
    count = 2000

    spawn().do("writes", port=port, count=count, size=MAX_PAYLOAD_BYTES)  # about 8 MiB into a 2 MiB ring, unread

    counters = capture.counters()
    assert counters["lost"] > 0
    assert counters["captured"] + counters["lost"] == count + 2  # plus the SINK header write and the reply read
    drained: list[TlsEvent] = []
    while batch := capture.poll(100):
        drained.extend(batch)
    assert len(drained) == counters["captured"]
    assert all(len(e.payload) == e.size for e in drained)


@root
@needs_libssl
def test_pids_are_those_of_the_sandbox_pid_namespace(make_capture: MakeCapture, spawn: Spawn, port: int) -> None:
    client = spawn(prefix=("unshare", "--pid", "--fork", "--kill-child"))
    assert client.pid == 1
    capture = make_capture(pidns=client.pidns)

    client.do("get", port=port, request=request_text("/", "namespaced"))

    events = collect(capture, lambda found: any(e.direction == "read" for e in found))
    assert {(e.pid, e.tid) for e in events} == {(1, 1)}


@root
@needs_libssl
def test_libraries_in_use_finds_the_libssl_a_process_maps(spawn: Spawn) -> None:
    client = spawn()
    gone = 2**22 + 1  # above pid_max's default: no such process

    found = libraries_in_use([client.process.pid, gone])

    assert LIBSSL in found
    assert all(os.stat(path).st_ino == os.stat(LIBSSL).st_ino for path in found if path.name == LIBSSL.name)
