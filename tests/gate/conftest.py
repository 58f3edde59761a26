"""A bare harness for the egress gate: a cgroup v2 directory per test, a veth pair into a network namespace
with servers on known addresses, a resolver stand-in on loopback, and gated child processes.

Traffic only ever goes to 127.0.0.0/8, ::1 and the test's own veth subnet (198.18.77.0/24, 2001:db8:77::/64).
Everything created here is removed in teardown, also when a test fails.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ebpf.gate import EgressGate, GateEvent

HERE = Path(__file__).resolve().parent
SERVICE_PORT = 7777  # TCP and UDP echo on every netns address
DNS_PORT = 53  # the netns servers answer here too, so an un-redirected query is recognisable

HOST_V4, HOST_V6 = "198.18.77.1", "2001:db8:77::1"
ALLOWED_V4 = "198.18.77.2"
DENIED_V4 = "198.18.77.3"
IN_CIDR_V4 = "198.18.77.33"  # inside 198.18.77.32/28
OUT_OF_CIDR_V4 = "198.18.77.50"
ALLOWED_V6 = "2001:db8:77::2"
DENIED_V6 = "2001:db8:77::3"
NO_SERVER_V4, NO_SERVER_V6 = "198.18.77.9", "2001:db8:77::9"  # nothing answers there: only redirected DNS is sent "to" them
LAB_ADDRESSES = (ALLOWED_V4, DENIED_V4, IN_CIDR_V4, OUT_OF_CIDR_V4, ALLOWED_V6, DENIED_V6)


def cgroup2_mount() -> Path:
    """Hybrid hosts mount cgroup v2 at /sys/fs/cgroup/unified; pure v2 hosts at /sys/fs/cgroup."""
    unified = Path("/sys/fs/cgroup/unified")
    return unified if (unified / "cgroup.procs").exists() else Path("/sys/fs/cgroup")


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Lab:
    namespace: str
    host_link: str
    server: subprocess.Popen[str]


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A network namespace behind a veth pair; its end holds the server addresses, ours 198.18.77.1 / 2001:db8:77::1."""
    tag = str(os.getpid())
    namespace, host_link, peer_link = f"kmgate-{tag}", f"kmg{tag}h", f"kmg{tag}p"
    server: subprocess.Popen[str] | None = None
    try:
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", host_link, "type", "veth", "peer", "name", peer_link)
        run("ip", "link", "set", peer_link, "netns", namespace)
        run("ip", "addr", "add", f"{HOST_V4}/24", "dev", host_link)
        run("ip", "-6", "addr", "add", f"{HOST_V6}/64", "dev", host_link, "nodad")
        run("ip", "link", "set", host_link, "up")
        for address in LAB_ADDRESSES:
            if ":" in address:
                run("ip", "-n", namespace, "-6", "addr", "add", f"{address}/64", "dev", peer_link, "nodad")
            else:
                run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", peer_link)
        run("ip", "-n", namespace, "link", "set", peer_link, "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                str(HERE / "netserver.py"),
                f"{SERVICE_PORT},{DNS_PORT}",
                *LAB_ADDRESSES,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        wait_until_reachable(ALLOWED_V4)
        wait_until_reachable(ALLOWED_V6)
        yield Lab(namespace, host_link, server)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True)  # gone with the namespace normally


def wait_until_reachable(address: str) -> None:
    """The veth's carrier and IPv6 neighbour discovery take a moment after `link up`."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((address, SERVICE_PORT), timeout=1) as sock:
                sock.sendall(b"hi")
                if sock.recv(100):
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Resolver:
    """Stands in for the daemon's resolver on 127.0.0.1 and ::1 (UDP and TCP, one port): answers `answer|<query>`."""

    port: int
    queries: list[tuple[str, Any]] = field(default_factory=list)


def bind_resolver_sockets() -> tuple[int, list[socket.socket]]:
    """UDP and TCP on 127.0.0.1 and ::1, all on one port; a random port may be taken for one of them, so retry."""
    for _ in range(50):
        sockets: list[socket.socket] = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(first)
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            for family, host, kind in (
                (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
                (socket.AF_INET, "127.0.0.1", socket.SOCK_STREAM),
                (socket.AF_INET6, "::1", socket.SOCK_STREAM),
            ):
                sock = socket.socket(family, kind)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(16)
            return port, sockets
        except OSError:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no port free on both 127.0.0.1 and ::1 for UDP and TCP")


@pytest.fixture(scope="session")
def resolver() -> Iterator[Resolver]:
    port, sockets = bind_resolver_sockets()
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ, "datagram" if sock.type == socket.SOCK_DGRAM else "accept")
    state = Resolver(port)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "datagram":
                    data, peer = sock.recvfrom(4096)
                    state.queries.append(("udp", peer))
                    sock.sendto(b"answer|" + data, peer)
                else:
                    connection, peer = sock.accept()
                    with connection:
                        connection.settimeout(2)
                        data = connection.recv(4096)
                        state.queries.append(("tcp", peer))
                        connection.sendall(b"answer|" + data)

    thread = threading.Thread(target=serve, name="test-resolver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stopping.set()
        thread.join(timeout=2)
        for sock in sockets:
            sock.close()


class GateCgroup:
    """A cgroup v2 directory made for one test; `sub()` makes nested ones, all removed at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir()

    def sub(self, *names: str) -> Path:
        path = self.path.joinpath(*names)
        path.mkdir(parents=True)
        return path

    def remove(self) -> None:
        """Kill what is left inside, then rmdir bottom-up (which also drops any programs attached here)."""
        if not self.path.exists():
            return
        (self.path / "cgroup.kill").write_text("1")
        directories = sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*directories, self.path]:
            deadline = time.monotonic() + 5
            while True:
                try:
                    directory.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


@pytest.fixture
def gate_cgroup(request: pytest.FixtureRequest) -> Iterator[GateCgroup]:
    cgroup = GateCgroup(cgroup2_mount() / f"kmgate-test-{os.getpid()}-{request.node.name[:40]}")
    try:
        yield cgroup
    finally:
        cgroup.remove()


MakeGate = Callable[..., EgressGate]


@pytest.fixture
def make_gate(resolver: Resolver) -> MakeGate:
    """A compiled gate pointing DNS at the test resolver; keyword arguments override the defaults."""

    def make(**overrides: Any) -> EgressGate:
        options: dict[str, Any] = {
            "resolver_v4": ("127.0.0.1", resolver.port),
            "resolver_v6": ("::1", resolver.port),
            "mode": "enforce",
        }
        options.update(overrides)
        return EgressGate(**options)

    return make


class Child:
    """A gated child process (tests/gate/netclient.py): it joins `cgroup` first, then runs operations on request."""

    def __init__(self, cgroup: Path, prefix: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [*prefix, sys.executable, str(HERE / "netclient.py"), str(cgroup)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.host_pid = self.process.pid
        hello = self._read()
        self.pid: int = hello["pid"]
        self.pidns: tuple[int, int] = (hello["pidns"][0], hello["pidns"][1])

    def _read(self, timeout: float = 10) -> dict[str, Any]:
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the child did not answer")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the child exited with {self.process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def do(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


Spawn = Callable[..., Child]


@pytest.fixture
def spawn(gate_cgroup: GateCgroup, lab: Lab) -> Iterator[Callable[..., Child]]:
    """Start gated children (in the test's cgroup unless told otherwise); all are killed at the end."""
    children: list[Child] = []

    def start(cgroup: Path | None = None, prefix: tuple[str, ...] = ()) -> Child:
        child = Child(cgroup or gate_cgroup.path, prefix)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.stop()


def wait_for_events(
    gate: EgressGate, matches: Callable[[GateEvent], bool], count: int = 1, timeout: float = 3
) -> list[GateEvent]:
    """The first `count` events that match (others are dropped), polling the ring buffer for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    found: list[GateEvent] = []
    others: list[GateEvent] = []
    while time.monotonic() < deadline:
        for event in gate.poll_events(100):
            (found if matches(event) else others).append(event)
        if len(found) >= count:
            return found[:count]
    raise AssertionError(f"{len(found)} of {count} matching events within {timeout}s: {found}; others: {others}")


def wait_for_event(gate: EgressGate, matches: Callable[[GateEvent], bool], timeout: float = 3) -> GateEvent:
    return wait_for_events(gate, matches, 1, timeout)[0]


# ---- a TLS server on loopback, for the capture tests --------------------------------------------------


def in_cgroup(cgroup: Path, *command: str) -> list[str]:
    """A command that moves itself into `cgroup` before it starts (the shell execs it, same pid)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *command]


def start_server(certificate: tuple[Path, Path], alpn: str | None = None) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, str(HERE / "tls_server.py"), str(certificate[0]), str(certificate[1])]
    server = subprocess.Popen([*command, *([alpn] if alpn else [])], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    ready = server.stdout.readline().split()
    assert ready[:1] == ["ready"], ready
    return server, int(ready[1])


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def port(certificate: tuple[Path, Path]) -> Iterator[int]:
    """The HTTP/1.1 TLS server's port on 127.0.0.1."""
    server, listening = start_server(certificate)
    try:
        yield listening
    finally:
        stop(server)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    """A private bpffs for pinned maps, unmounted (with every pin in it) at the end."""
    directory = tmp_path / "bpffs"
    directory.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)
