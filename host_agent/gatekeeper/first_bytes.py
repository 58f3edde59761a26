"""What a connection's first bytes ask for: the TLS ClientHello's SNI, or the HTTP/1.x Host.

Pure and socket-free, so the parsers are tested on real ClientHellos and on every truncation of them.
The forwarder (proxy.py) feeds them the bytes read so far; `NEED_MORE` means "a valid beginning, keep
reading", None means "there is no name here", and nothing a client sends makes them raise.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

TLS_RECORD_HEADER = 5
MAX_TLS_RECORD = 16384  # RFC 8446 5.1: a plaintext record carries at most 2^14 bytes
MAX_FIRST_BYTES = MAX_TLS_RECORD + TLS_RECORD_HEADER  # one full record, or an HTTP request head of that size
TLS_HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME_EXTENSION = 0x0000
HOST_NAME_TYPE = 0x00
MAX_METHOD_LENGTH = 32


class NeedMore(enum.Enum):
    """A parser's answer when the bytes so far are a valid beginning but too short to decide."""

    NEED_MORE = "need more bytes"


NEED_MORE = NeedMore.NEED_MORE


# ---- TLS ------------------------------------------------------------------------------------------


class _Malformed(Exception):
    """A length field runs past its container: the bytes are not the structure they claim to be."""


class _Reader:
    """Big-endian fields and length-prefixed vectors (RFC 8446 3.4) read from bytes, strictly within bounds."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, length: int) -> bytes:
        if length > self.remaining:
            raise _Malformed(f"{length} bytes wanted, {self.remaining} left")
        chunk = self._data[self._offset : self._offset + length]
        self._offset += length
        return chunk

    def integer(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.integer(length_size))


def sni_from_client_hello(data: bytes) -> str | None | NeedMore:
    """The host_name in a TLS ClientHello's server_name extension, as sent.

    NEED_MORE while the ClientHello is incomplete; None when the bytes are not a ClientHello or it names
    no host. A ClientHello split over several handshake records is reassembled (clients may fragment
    it), as long as all of it lies in `data`. Pure and total: any bytes give one of the three answers.
    """
    handshake = _first_handshake_message(data)
    if handshake is None or isinstance(handshake, NeedMore):
        return handshake
    try:
        return _server_name(handshake)
    except _Malformed:
        return None


def _first_handshake_message(data: bytes) -> bytes | None | NeedMore:
    """The first handshake message, joined from the fragments of as many handshake records as it spans."""
    fragments = b""
    offset = 0
    while True:
        if len(fragments) >= 4:
            message_length = 4 + int.from_bytes(fragments[1:4], "big")
            if len(fragments) >= message_length:
                return fragments[:message_length]
        header = data[offset : offset + TLS_RECORD_HEADER]
        if len(header) >= 1 and header[0] != TLS_HANDSHAKE:
            return None
        if len(header) >= 2 and header[1] != 3:  # SSL 3.0 and every TLS version say 3 here
            return None
        if len(header) < TLS_RECORD_HEADER:
            return NEED_MORE
        record_length = int.from_bytes(header[3:5], "big")
        if record_length == 0 or record_length > MAX_TLS_RECORD:
            return None
        fragment = data[offset + TLS_RECORD_HEADER : offset + TLS_RECORD_HEADER + record_length]
        if len(fragment) < record_length:
            return NEED_MORE
        fragments += fragment
        offset += TLS_RECORD_HEADER + record_length


def _server_name(handshake: bytes) -> str | None:
    """The host_name of a complete ClientHello message (RFC 8446 4.1.2, RFC 6066 3)."""
    message = _Reader(handshake)
    if message.integer(1) != CLIENT_HELLO:
        return None
    hello = _Reader(message.vector(3))
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.remaining == 0:
        return None  # no extensions at all (SSL 3.0-era hellos)
    extensions = _Reader(hello.vector(2))
    while extensions.remaining:
        extension_type = extensions.integer(2)
        extension = extensions.vector(2)
        if extension_type == SERVER_NAME_EXTENSION:
            return _host_name(extension)
    return None


def _host_name(extension: bytes) -> str | None:
    names = _Reader(_Reader(extension).vector(2))
    while names.remaining:
        name_type = names.integer(1)
        name = names.vector(2)
        if name_type == HOST_NAME_TYPE:
            return _printable_ascii(name)
    return None


def _printable_ascii(raw: bytes) -> str | None:
    """The text of a name field, or None when it holds anything but visible ASCII (which no DNS name does)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or not text.isprintable() or " " in text:
        return None
    return text


# ---- HTTP -----------------------------------------------------------------------------------------

_TOKEN_CHARACTER = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"  # RFC 9110 5.6.2: methods and field names are tokens
_TOKEN = _TOKEN_CHARACTER + b"+"
# Every beginning of a request line: a method, a space, a visible target, a space, then any prefix of
# "HTTP/1.x\r" (the nested optional groups).
_PARTIAL_REQUEST_LINE = re.compile(
    _TOKEN_CHARACTER
    + b"{1,%d}" % MAX_METHOD_LENGTH
    + rb"(?: [\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?"
)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.[0-9]")
_FIELD_NAME = re.compile(_TOKEN)
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_PORT = re.compile(r"[0-9]*")


@dataclass(frozen=True)
class _HttpRequest:
    """The parts of a complete HTTP/1.x request head the forwarder decides on; `problem` set means refuse."""

    name: str | None
    problem: str | None


def host_from_http_request(data: bytes) -> str | None | NeedMore:
    """The host an HTTP/1.x request asks for (port and IPv6 brackets removed), as sent.

    NEED_MORE until the head (up to the empty line) is complete; None for anything the forwarder
    refuses: not HTTP, no Host, two different Hosts, CONNECT, an unreadable header. For an
    absolute-form request (`GET http://host/ HTTP/1.1`) the target's host is the one asked for
    (RFC 9112 3.2.2), and a Host header naming another host is refused.
    """
    request = _http_request(data)
    if request is None or isinstance(request, NeedMore):
        return request
    return request.name if request.problem is None else None


def _http_request(data: bytes) -> _HttpRequest | None | NeedMore:
    head_end = data.find(b"\r\n\r\n")
    line_end = data.find(b"\r\n")
    if line_end < 0:
        return NEED_MORE if _could_start_request(data) else None
    request_line = _REQUEST_LINE.fullmatch(data[:line_end])
    if request_line is None:
        return None
    if head_end < 0:
        return NEED_MORE
    fields = _header_fields(data[line_end + 2 : head_end])
    if fields is None:
        return None
    method = request_line.group(1).decode("ascii")
    target = request_line.group(2).decode("ascii")
    hosts = [value for name, value in fields if name == "host"]
    return _judge_http(method, target, hosts)


def _could_start_request(data: bytes) -> bool:
    """Whether bytes without a line end yet can still become a request line (so waiting for more makes sense)."""
    return not data or _PARTIAL_REQUEST_LINE.fullmatch(data) is not None


def _header_fields(block: bytes) -> list[tuple[str, str]] | None:
    """(lower-case name, value) of each header line; None when a line is not `name: value` in visible ASCII.

    Line folding, whitespace before the colon and control characters are refused rather than guessed
    at (RFC 9112 5.1-5.2 lets a server reject them), so no server reads a Host this parser did not.
    """
    if not block:
        return []
    fields: list[tuple[str, str]] = []
    for line in block.split(b"\r\n"):
        name, colon, raw_value = line.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            return None
        value = _field_value(raw_value)
        if value is None:
            return None
        fields.append((name.decode("ascii").lower(), value))
    return fields


def _field_value(raw: bytes) -> str | None:
    value = raw.strip(b" \t")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text and not text.replace("\t", " ").isprintable():
        return None
    return text


def _judge_http(method: str, target: str, hosts: list[str]) -> _HttpRequest:
    """Which host a parsed request asks for, or why it is refused."""
    host_names = [_host_of_authority(value) for value in hosts]
    absolute = _ABSOLUTE_FORM.match(target)
    if method == "CONNECT":
        return _HttpRequest(_host_of_authority(target) or (host_names[0] if host_names else None), "CONNECT not supported")
    if None in host_names:
        return _HttpRequest(None, "malformed Host header")
    named = [name for name in host_names if name is not None]
    if len({name.lower() for name in named}) > 1:
        return _HttpRequest(named[0], "conflicting Host headers")
    if absolute is not None:
        target_host = _host_of_authority(absolute.group(1).rpartition("@")[2])
        if target_host is None:
            return _HttpRequest(None, "malformed request target")
        if named and named[0].lower() != target_host.lower():
            return _HttpRequest(target_host, "Host header does not match the request target")
        return _HttpRequest(target_host, None)
    if not named:
        return _HttpRequest(None, "no Host header")
    return _HttpRequest(named[0], None)


def _host_of_authority(authority: str) -> str | None:
    """The host of `host`, `host:port`, `[v6]` or `[v6]:port`; None when that is not what it is.

    An unbracketed value with several colons is returned whole: it can only be an IPv6 literal (or
    junk), and must be refused as one, not cut at its last colon into something else.
    """
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _PORT.fullmatch(port[1:]))):
            return None
    elif authority.count(":") > 1:
        host = authority
    else:
        host, _colon, port = authority.partition(":")
        if _PORT.fullmatch(port) is None:
            return None
    return host or None


# ---- what a connection asks for -------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the first bytes of a connection ask for: the protocol, the name, or why it is refused."""

    protocol: str
    name: str | None
    problem: str | None


def identify_request(data: bytes) -> Request | NeedMore:
    """TLS by its first byte, else HTTP; anything else is refused as soon as it cannot be either."""
    if not data:
        return NEED_MORE
    if data[0] == TLS_HANDSHAKE:
        sni = sni_from_client_hello(data)
        if isinstance(sni, NeedMore):
            return sni
        return Request("tls", sni, None if sni is not None else "no SNI")
    request = _http_request(data)
    if isinstance(request, NeedMore):
        return request
    if request is None:
        return Request("unknown", None, "neither TLS nor HTTP")
    return Request("http", request.name, request.problem)


def unfinished_request(data: bytes, reason: str) -> Request:
    """The request of a connection whose first bytes ended before a decision (timeout, close, size)."""
    return Request("tls" if data[:1] == bytes([TLS_HANDSHAKE]) else "unknown", None, reason)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.rstrip("."))
    except ValueError:
        return False
    return True
