"""The loader's pure parts: allowlist entries to trie keys, ring buffer records to events (no kernel needed)."""

from __future__ import annotations

import struct

import pytest

from ebpf.gate import GateError, allow_key, parse_event


@pytest.mark.parametrize(
    ("network", "key"),
    [
        ("1.2.3.4", (4, 32, bytes([1, 2, 3, 4]))),
        ("10.1.2.3/8", (4, 8, bytes([10, 0, 0, 0]))),  # host bits cleared: allow and revoke name one key
        (" 192.168.0.0/16 ", (4, 16, bytes([192, 168, 0, 0]))),
        ("2001:db8::1", (6, 128, bytes.fromhex("20010db8" + "00" * 10 + "0001"))),
        ("2001:db8::/32", (6, 32, bytes.fromhex("20010db8" + "00" * 12))),
        ("::ffff:9.9.9.9", (4, 32, bytes([9, 9, 9, 9]))),  # v4-mapped goes to the IPv4 trie
        ("::ffff:10.0.0.0/104", (4, 8, bytes([10, 0, 0, 0]))),
        ("::/0", (6, 0, bytes(16))),
    ],
)
def test_allow_key(network: str, key: tuple[int, int, bytes]) -> None:
    assert allow_key(network) == key


@pytest.mark.parametrize("network", ["example.com", "10.0.0.0/33", "", "1.2.3"])
def test_allow_key_refuses_what_is_not_an_address(network: str) -> None:
    with pytest.raises(GateError, match="not an IP address"):
        allow_key(network)


def record(family: int, proto: int, verdict: int, address: bytes, port: int = 443, hook: int = 0, socket_type: int = 0) -> bytes:
    return struct.pack(
        "=QIIHBBHBB16s16s", 5, 42, 1500, port, family, verdict, proto, hook, socket_type, address, b"curl\0garbage"
    )


def test_parse_event_ipv4() -> None:
    event = parse_event(record(2, 6, 1, bytes([198, 18, 77, 3]) + bytes(12)))
    assert (event.ts_ns, event.pid, event.uid, event.family, event.proto) == (5, 42, 1500, 4, "tcp")
    assert (event.verdict, event.address, event.port, event.comm) == ("deny", "198.18.77.3", 443, "curl")
    assert (event.hook, event.socket_type) == ("connect", "")


def test_parse_event_ipv6_and_v4_mapped() -> None:
    assert parse_event(record(10, 17, 2, bytes.fromhex("20010db80077" + "00" * 9 + "03"))).address == "2001:db8:77::3"
    mapped = parse_event(record(10, 6, 3, bytes(10) + b"\xff\xff" + bytes([8, 8, 8, 8]), port=53))
    assert (mapped.family, mapped.address, mapped.verdict, mapped.proto) == (6, "8.8.8.8", "redirect", "tcp")


def test_parse_event_of_a_refused_socket_names_its_protocol_and_kind() -> None:
    """MPTCP's protocol number (262) does not fit a byte: the event carries 16 bits."""
    event = parse_event(record(2, 262, 1, bytes(16), port=0, hook=1, socket_type=1))
    assert (event.hook, event.verdict, event.proto, event.socket_type, event.family) == ("socket", "deny", "mptcp", "stream", 4)
    raw_icmp6 = parse_event(record(10, 58, 1, bytes(16), port=0, hook=1, socket_type=3))
    assert (raw_icmp6.proto, raw_icmp6.socket_type, raw_icmp6.family) == ("icmpv6", "raw", 6)


def test_parse_event_of_a_refused_bind() -> None:
    event = parse_event(record(2, 17, 1, bytes(16), port=10053, hook=2))
    assert (event.hook, event.address, event.port, event.proto) == ("bind", "0.0.0.0", 10053, "udp")
