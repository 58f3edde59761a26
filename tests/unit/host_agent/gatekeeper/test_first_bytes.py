"""The egress forwarder's pure parts: reading SNI and Host from first bytes, and choosing where to connect.

ClientHellos are real ones, written by Python's `ssl` module into a memory BIO; no sockets here.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.gatekeeper.first_bytes import (
    MAX_TLS_RECORD,
    NEED_MORE,
    NeedMore,
    Request,
    host_from_http_request,
    identify_request,
    sni_from_client_hello,
)
from host_agent.gatekeeper.proxy import _http_refusal, _target_address

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
HOST_NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda name: not name.replace(".", "").isdigit())


def client_hello(server_hostname: str | None, maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> bytes:
    """The first flight a Python TLS client sends for this server name (None: no SNI at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_into_records(hello: bytes, first_fragment: int) -> bytes:
    """The same handshake message re-framed as two handshake records, the way some clients fragment it."""
    message = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    version = hello[1:3]
    head, tail = message[:first_fragment], message[first_fragment:]
    return b"".join(b"\x16" + version + len(part).to_bytes(2, "big") + part for part in (head, tail))


# ---- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_hostname", "sent"),
    [
        ("allowed.test", "allowed.test"),
        ("API.Allowed.Test", "API.Allowed.Test"),  # case as sent: the policy lower-cases, not the parser
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("bücher.test", "xn--bcher-kva.test"),  # Python sends the A-label, as every client must (RFC 6066)
        ("a" * 63 + "." + "b" * 63 + ".test", "a" * 63 + "." + "b" * 63 + ".test"),
    ],
)
def test_sni_is_read_from_a_real_client_hello(server_hostname: str, sent: str) -> None:
    assert sni_from_client_hello(client_hello(server_hostname)) == sent


def test_sni_is_read_from_a_tls12_client_hello() -> None:
    assert sni_from_client_hello(client_hello("old.test", ssl.TLSVersion.TLSv1_2)) == "old.test"


@pytest.mark.parametrize("server_hostname", [None, "127.0.0.1", "::1"])
def test_a_client_hello_without_sni_gives_none(server_hostname: str | None) -> None:
    """Python, like browsers, sends no SNI for an IP address; such a connection has no name to allow."""
    hello = client_hello(server_hostname)
    assert hello[0] == 0x16
    assert sni_from_client_hello(hello) is None


def test_every_truncation_of_a_client_hello_needs_more() -> None:
    hello = client_hello("allowed.test")
    for length in range(len(hello)):
        assert sni_from_client_hello(hello[:length]) is NEED_MORE, length
    assert sni_from_client_hello(hello) == "allowed.test"
    assert sni_from_client_hello(hello + b"\x17\x03\x03\x00\x05early") == "allowed.test"


def test_a_client_hello_over_two_records_is_reassembled() -> None:
    hello = client_hello("split.test")
    for first_fragment in (1, 3, 4, 40, 100):
        split = split_into_records(hello, first_fragment)
        assert sni_from_client_hello(split) == "split.test", first_fragment
        assert sni_from_client_hello(split[:-1]) is NEED_MORE


@pytest.mark.parametrize(
    "change",
    [
        lambda hello: b"\x17" + hello[1:],  # application data, not a handshake
        lambda hello: hello[:1] + b"\x02" + hello[2:],  # not SSL 3 / TLS
        lambda hello: hello[:3] + (MAX_TLS_RECORD + 1).to_bytes(2, "big") + hello[5:],  # oversized record
        lambda hello: hello[:3] + b"\x00\x00" + hello[5:],  # empty record
        lambda hello: hello[:5] + b"\x02" + hello[6:],  # a ServerHello
        lambda hello: split_into_records(hello, 10)[:15] + b"\x15" + split_into_records(hello, 10)[16:],  # alert mid-hello
    ],
)
def test_what_is_not_a_client_hello_gives_none(change: Callable[[bytes], bytes]) -> None:
    assert sni_from_client_hello(change(client_hello("allowed.test"))) is None


def test_a_lying_inner_length_gives_none_not_an_exception() -> None:
    hello = bytearray(client_hello("allowed.test"))
    hello[9 + 34] = 0xFF  # session id length beyond the message
    assert sni_from_client_hello(bytes(hello)) is None


@given(HOST_NAME)
def test_sni_round_trips_any_host_name(name: str) -> None:
    assert sni_from_client_hello(client_hello(name)) == name


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert sni_from_client_hello(data) is None or isinstance(sni_from_client_hello(data), (str, NeedMore))
    assert host_from_http_request(data) is None or isinstance(host_from_http_request(data), (str, NeedMore))


@given(st.binary(max_size=600))
def test_random_bytes_behind_a_handshake_header_never_raise(body: bytes) -> None:
    """Only a handshake message longer than its record (continued in the next one) waits for more."""
    data = b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    result = sni_from_client_hello(data)
    continued = len(body) < 4 or 4 + int.from_bytes(body[1:4], "big") > len(body)
    if not body:
        assert result is None  # an empty record
    elif continued:
        assert result is NEED_MORE
    else:
        assert result is None or isinstance(result, str)


HELLO = client_hello("allowed.test")


@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_client_hellos_never_raise(corruptions: list[tuple[int, int]]) -> None:
    damaged = bytearray(HELLO)
    for index, value in corruptions:
        damaged[index] = value
    result = sni_from_client_hello(bytes(damaged))
    assert result is None or result is NEED_MORE or isinstance(result, str)


# ---- HTTP -----------------------------------------------------------------------------------------


def request(*header_lines: str, line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join([line, *header_lines]) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (request("Host: example.test"), "example.test"),
        (request("Host: example.test:8080", "Accept: */*"), "example.test"),
        (request("User-Agent: curl/8", "hOsT:Example.Test"), "Example.Test"),
        (request("Host:   spaced.test \t"), "spaced.test"),
        (request("Host: [2001:db8::1]:8443"), "2001:db8::1"),
        (request("Host: [::1]"), "::1"),
        (request("Host: ::1"), "::1"),  # unbracketed IPv6: returned whole, so it is refused as a literal
        (request("Host: example.test:"), "example.test"),  # an empty port is allowed by RFC 3986
        (request("Host: same.test", "Host: SAME.test:80"), "same.test"),  # the same host twice is no conflict
        (request("Host: example.test", line="POST /upload HTTP/1.0"), "example.test"),
        (request(line="GET http://absolute.test:8080/path?q=1 HTTP/1.1"), "absolute.test"),
        (request("Host: absolute.test", line="GET http://user@absolute.test/ HTTP/1.1"), "absolute.test"),
        (request("Host: example.test", line="OPTIONS * HTTP/1.1"), "example.test"),
    ],
)
def test_host_is_read_from_a_request(data: bytes, expected: str) -> None:
    assert host_from_http_request(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        request("Host: one.test", "Host: two.test"),  # two different hosts: which one the server uses is a guess
        request("Accept: */*"),  # no Host
        request(line="GET / HTTP/1.0"),  # HTTP/1.0 without Host: no name to judge
        request("Host: evil.test", line="GET http://absolute.test/ HTTP/1.1"),  # target and Host disagree
        request("Host: allowed.test:443", line="CONNECT allowed.test:443 HTTP/1.1"),
        request("Host: example.test", " folded.test"),  # obsolete line folding
        request("Host : example.test"),  # whitespace before the colon (RFC 9112 5.1: must be rejected)
        request("Host: exa\x01mple.test"),
        request("Host: caf\xe9.test"),
        request("Host: example.test:http"),
        request("Host: [::1"),
        request("Host: [::1]x"),
        request("Host:"),
        request("Host: example.test", "no colon here"),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n",
        b" GET / HTTP/1.1",
        b"X" * 40,  # a method far longer than any real one, still without a space
    ],
)
def test_requests_the_forwarder_refuses_give_none(data: bytes) -> None:
    assert host_from_http_request(data) is None


def test_every_truncation_of_a_request_needs_more() -> None:
    data = request("Host: example.test", "Accept: */*")
    for length in range(len(data)):
        assert host_from_http_request(data[:length]) is NEED_MORE, data[:length]
    assert host_from_http_request(data) == "example.test"


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=200))
def test_random_text_after_a_request_line_never_raises(headers: str) -> None:
    result = host_from_http_request(b"GET / HTTP/1.1\r\n" + headers.encode("ascii") + b"\r\n\r\n")
    assert result is None or isinstance(result, str)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (request("Host: example.test"), Request("http", "example.test", None)),
        (request("Host: a.test", "Host: b.test"), Request("http", "a.test", "conflicting Host headers")),
        (request(line="CONNECT evil.test:443 HTTP/1.1"), Request("http", "evil.test", "CONNECT not supported")),
        (request("Accept: */*"), Request("http", None, "no Host header")),
        (
            request("Host: a.test", line="GET http://b.test/ HTTP/1.1"),
            Request("http", "b.test", "Host header does not match the request target"),
        ),
        (client_hello("allowed.test"), Request("tls", "allowed.test", None)),
        (client_hello(None), Request("tls", None, "no SNI")),
        (b"SSH-2.0-OpenSSH_9.6\r\n", Request("unknown", None, "neither TLS nor HTTP")),
        (b"\x00\x00\x00\x01", Request("unknown", None, "neither TLS nor HTTP")),
        (b"", NEED_MORE),
        (b"GET / HTTP/1.1\r\nHost: a", NEED_MORE),
    ],
)
def test_first_bytes_are_identified_with_a_reason(data: bytes, expected: Request | NeedMore) -> None:
    assert identify_request(data) == expected


# ---- where to connect -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolved", "original", "expected"),
    [
        (["192.0.2.1", "192.0.2.2"], "192.0.2.2", "192.0.2.2"),  # the client's own pick among the name's addresses
        (["192.0.2.1", "192.0.2.2"], "203.0.113.9", "192.0.2.1"),  # anything else: never the original
        (["2001:db8::1", "192.0.2.1"], "203.0.113.9", "192.0.2.1"),  # same family first
        (["192.0.2.1", "2001:db8::1"], "2001:db8::99", "2001:db8::1"),
        (["2001:db8::1"], "203.0.113.9", "2001:db8::1"),  # no address of that family: the name's first
        (["192.0.2.1"], "::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4-mapped original is that IPv4 address
        (["2001:DB8::0:1"], "2001:db8::1", "2001:db8::1"),
        (["not an address", "192.0.2.3"], "203.0.113.9", "192.0.2.3"),
        (["not an address"], "192.0.2.1", None),
        ([], "192.0.2.1", None),
    ],
)
def test_target_address(resolved: list[str], original: str, expected: str | None) -> None:
    assert _target_address(resolved, original) == expected


def test_http_refusals_say_why_and_close() -> None:
    forbidden = _http_refusal("deny", "evil.test", "not in allowlist")
    head, _, body = forbidden.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Connection: close" in head and b"Content-Type: text/plain" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert b"evil.test" in body and b"allowlist" in body and b"km egress proxy" in body
    assert _http_refusal("deny", "gone.test", "name did not resolve").startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert _http_refusal("error", "down.test", "upstream connect failed: refused").startswith(b"HTTP/1.1 502 ")
    assert b"CONNECT not supported" in _http_refusal("deny", "a.test", "CONNECT not supported")
