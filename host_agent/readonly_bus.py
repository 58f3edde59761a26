"""A read-only system bus for the agent's units: `sudo systemctl status` works; `sudo systemctl start`,
`systemd-run`, `busctl call … StartUnit` and every other change do not.

PID 1 trusts any root caller, on the system bus and on its private socket alike (systemd 252 checks the
uid, and the agent may be root through sudo). So in the agent's units PID 1's private socket is hidden,
and at the system bus's path they find this proxy's socket instead (host_agent/containment.py);
systemctl, finding no private socket, falls back to the bus. The proxy relays the authentication lines
untouched, then reads every message the client sends and passes on only calls that read state (the
bus's own bookkeeping, properties, PID 1's listings); any other call gets an AccessDenied error and never
reaches the bus. What the bus sends back is relayed as it is. The filter goes by interface and member,
not destination, so calling a service by its unique name changes nothing.

Only root is served: the proxy's own connection is root's, and the bus must not take a non-root client
for root. (systemctl as the sandbox user therefore finds no bus; as root through sudo it does.)

The D-Bus wire format is read by hand (header fields only), because only the routing fields matter and
a full binding would be a heavy dependency inside every sandbox. xdg-dbus-proxy, the usual filter, does
not understand sd-bus clients that send their first message with the end of authentication.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger("km-host-agent.readonly-bus")

SYSTEM_BUS_SOCKET: Final = Path("/run/dbus/system_bus_socket")
PROXY_SOCKET: Final = Path("/run/km-bus/system_bus_socket")
MAX_MESSAGE_BYTES: Final = 1 << 24  # D-Bus's own limit is 128 MiB; systemctl's calls are tiny
_AUTH_END: Final = b"BEGIN\r\n"
_METHOD_CALL, _METHOD_RETURN, _ERROR, _SIGNAL = 1, 2, 3, 4
_FIELD_PATH, _FIELD_INTERFACE, _FIELD_MEMBER, _FIELD_UNIX_FDS = 1, 2, 3, 9
_MANAGER_READS: Final = frozenset(
    {
        "GetUnit",
        "GetUnitByPID",
        "GetUnitByInvocationID",
        "GetUnitByControlGroup",
        "LoadUnit",
        "GetUnitProcesses",
        "GetJob",
        "GetJobAfter",
        "GetJobBefore",
        "ListUnits",
        "ListUnitsFiltered",
        "ListUnitsByPatterns",
        "ListUnitsByNames",
        "ListJobs",
        "ListUnitFiles",
        "ListUnitFilesByPatterns",
        "GetUnitFileState",
        "GetUnitFileLinks",
        "GetDefaultTarget",
        "GetDynamicUsers",
        "LookupDynamicUserByName",
        "LookupDynamicUserByUID",
        "Dump",
    }
)
# Interface → the members the agent may call (None: all of them).
ALLOWED_CALLS: Final[dict[str, frozenset[str] | None]] = {
    # The bus's own bookkeeping, without owning names, activating services or monitoring others.
    "org.freedesktop.DBus": frozenset(
        {
            "Hello",
            "AddMatch",
            "RemoveMatch",
            "GetNameOwner",
            "NameHasOwner",
            "ListNames",
            "ListActivatableNames",
            "ListQueuedOwners",
            "GetConnectionUnixUser",
            "GetConnectionUnixProcessID",
            "GetConnectionCredentials",
            "GetId",
        }
    ),
    "org.freedesktop.DBus.Properties": frozenset({"Get", "GetAll"}),
    "org.freedesktop.DBus.Introspectable": None,
    "org.freedesktop.DBus.Peer": None,
    "org.freedesktop.systemd1.Manager": _MANAGER_READS,
    "org.freedesktop.systemd1.Service": frozenset({"GetProcesses"}),
    "org.freedesktop.systemd1.Scope": frozenset({"GetProcesses"}),
    "org.freedesktop.systemd1.Slice": frozenset({"GetProcesses"}),
    "org.freedesktop.systemd1.Socket": frozenset({"GetProcesses"}),
    "org.freedesktop.systemd1.Mount": frozenset({"GetProcesses"}),
    "org.freedesktop.systemd1.Swap": frozenset({"GetProcesses"}),
}


class MessageError(ValueError):
    """Bytes that are not a D-Bus message this proxy can judge: the connection is closed."""


@dataclass(frozen=True)
class Message:
    kind: int
    serial: int
    little_endian: bool
    path: str | None
    interface: str | None
    member: str | None
    carries_fds: bool


def message_length(buffer: bytes | bytearray) -> int | None:
    """The whole message's length once its fixed header is in `buffer`, else None."""
    if len(buffer) < 16:
        return None
    order = _order(buffer[0])
    body_length, _serial, fields_length = struct.unpack_from(order + "III", buffer, 4)
    return _align(16 + int(fields_length), 8) + int(body_length)


def parse_message(buffer: bytes | bytearray) -> Message:
    """The routing header fields of the complete message at the start of `buffer`."""
    try:
        return _parse(buffer)
    except (struct.error, IndexError) as error:
        raise MessageError(f"malformed header: {error}") from error


def _parse(buffer: bytes | bytearray) -> Message:
    length = message_length(buffer)
    if length is None or length > len(buffer):
        raise MessageError("incomplete message")
    if length > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {length} bytes")
    order = _order(buffer[0])
    kind, version = buffer[1], buffer[3]
    if version != 1:
        raise MessageError(f"protocol version {version}")
    _body_length, serial, fields_length = struct.unpack_from(order + "III", buffer, 4)
    fields: dict[int, str | int] = {}
    offset, end = 16, 16 + fields_length
    while offset < end:
        offset = _align(offset, 8)
        if offset >= end:
            break
        code, signature_length = buffer[offset], buffer[offset + 1]
        signature = bytes(buffer[offset + 2 : offset + 2 + signature_length])
        offset += 3 + signature_length
        value, offset = _read_value(buffer, offset, signature, order)
        fields[code] = value
    if offset > end:
        raise MessageError("header fields overrun their array")

    def text(code: int) -> str | None:
        value = fields.get(code)
        return value if isinstance(value, str) else None

    return Message(
        kind=kind,
        serial=serial,
        little_endian=order == "<",
        path=text(_FIELD_PATH),
        interface=text(_FIELD_INTERFACE),
        member=text(_FIELD_MEMBER),
        carries_fds=bool(fields.get(_FIELD_UNIX_FDS)),
    )


def is_allowed(message: Message) -> bool:
    """Replies pass (they answer PID 1, they ask nothing); of calls only reads, and nothing carrying fds."""
    if message.carries_fds:
        return False
    if message.kind in (_METHOD_RETURN, _ERROR):
        return True
    if message.kind != _METHOD_CALL or message.interface is None or message.member is None:
        return False
    if message.interface not in ALLOWED_CALLS:
        return False
    members = ALLOWED_CALLS[message.interface]
    return members is None or message.member in members


def access_denied(message: Message) -> bytes:
    """An AccessDenied error answering `message`, in the client's byte order."""
    order = "<" if message.little_endian else ">"
    text = f"km: the agent's bus is read-only; {message.interface}.{message.member} is not allowed".encode()
    body = struct.pack(order + "I", len(text)) + text + b"\0"
    name = b"org.freedesktop.DBus.Error.AccessDenied"
    fields = bytearray()
    fields += _field(4, b"s", struct.pack(order + "I", len(name)) + name + b"\0", len(fields))
    fields += _field(5, b"u", struct.pack(order + "I", message.serial), len(fields))
    fields += _field(8, b"g", b"\x01s\0", len(fields))
    header = struct.pack(order + "cBBBIII", b"l" if order == "<" else b"B", _ERROR, 1, 1, len(body), 1, len(fields))
    unpadded = header + bytes(fields)
    return unpadded + bytes(_align(len(unpadded), 8) - len(unpadded)) + body


def _field(code: int, signature: bytes, value: bytes, offset: int) -> bytes:
    """One header field struct at `offset` within the fields array (which starts 8-aligned at 16)."""
    padding = bytes(_align(offset, 8) - offset)
    head = bytes([code, len(signature)]) + signature + b"\0"
    inner_offset = offset + len(padding) + len(head)
    if signature in (b"s", b"u"):
        head += bytes(_align(inner_offset, 4) - inner_offset)
    return padding + head + value


def _read_value(buffer: bytes | bytearray, offset: int, signature: bytes, order: str) -> tuple[str | int, int]:
    if signature in (b"s", b"o"):
        offset = _align(offset, 4)
        (length,) = struct.unpack_from(order + "I", buffer, offset)
        start = offset + 4
        return bytes(buffer[start : start + length]).decode(errors="replace"), start + length + 1
    if signature == b"g":
        length = buffer[offset]
        return bytes(buffer[offset + 1 : offset + 1 + length]).decode(errors="replace"), offset + 2 + length
    if signature in (b"u", b"h"):
        offset = _align(offset, 4)
        (number,) = struct.unpack_from(order + "I", buffer, offset)
        return int(number), offset + 4
    raise MessageError(f"unexpected header field signature {signature!r}")


def _order(byte: int) -> str:
    if byte == ord("l"):
        return "<"
    if byte == ord("B"):
        return ">"
    raise MessageError(f"bad endianness marker {byte!r}")


def _align(value: int, boundary: int) -> int:
    return (value + boundary - 1) // boundary * boundary


class ReadOnlyBus:
    """Listens on `listen`; each root client gets its own connection to the system bus."""

    def __init__(self, listen: Path = PROXY_SOCKET, upstream: Path = SYSTEM_BUS_SOCKET, *, root_only: bool = True) -> None:
        """`root_only` False serves any uid (tests, which run everything as root, say nothing by it)."""
        self.root_only = root_only
        self.listen = listen
        self.upstream = upstream
        self.denied = 0
        self._server: socket.socket | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self.listen.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.listen.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.listen))
        os.chmod(self.listen, 0o666)  # as the bus socket's: who may talk is decided per connection
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, name="bus-readonly", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None

    def status(self) -> dict[str, object]:
        return {"socket": str(self.listen), "denied": self.denied}

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="bus-readonly-client", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        uid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if self.root_only and uid != 0:
            client.close()  # the bus would see this client as root: serve root only
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self.upstream))
        except OSError:
            client.close()
            upstream.close()
            return
        writing = threading.Lock()
        threading.Thread(target=_relay, args=(upstream, client, writing), name="bus-readonly-reply", daemon=True).start()
        try:
            self._filter(client, upstream, writing)
        except MessageError as error:
            log.info("read-only bus client closed", extra={"fields": {"reason": str(error)}})
        except OSError:  # the client or the bus went away
            pass
        finally:
            _close(client, upstream)

    def _filter(self, client: socket.socket, upstream: socket.socket, writing: threading.Lock) -> None:
        """Authentication lines go through one by one as they are (some clients wait for each answer, sd-bus
        sends them all with its first message); after BEGIN, whole messages, judged one by one."""
        buffer = bytearray()
        authenticated = False
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while not authenticated and (end := buffer.find(b"\r\n")) >= 0:
                line = bytes(buffer[: end + 2])  # the first one starts with the credentials byte, NUL
                del buffer[: end + 2]
                upstream.sendall(line)
                authenticated = line.lstrip(b"\0") == _AUTH_END
            if not authenticated:
                if len(buffer) > 16384:
                    raise MessageError("authentication that never ends")
                continue
            while (length := message_length(buffer)) is not None and length <= len(buffer):
                message = parse_message(buffer)
                raw = bytes(buffer[:length])
                del buffer[:length]
                if is_allowed(message):
                    upstream.sendall(raw)
                    continue
                self.denied += 1
                log.warning(
                    "refused a bus call from the agent",
                    extra={"fields": {"interface": message.interface, "member": message.member, "path": message.path}},
                )
                if message.kind == _METHOD_CALL:
                    with writing:
                        client.sendall(access_denied(message))
            if len(buffer) > MAX_MESSAGE_BYTES:
                raise MessageError("message too large")


def _relay(source: socket.socket, target: socket.socket, writing: threading.Lock) -> None:
    try:
        while chunk := source.recv(65536):
            with writing:
                target.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(source, target)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
