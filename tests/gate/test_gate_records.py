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


def record(family: int, proto: int, verdict: int, address: bytes, port: int = 443) -> bytes:
    return struct.pack("=QIIHBBB3x16s16s", 5, 42, 1500, port, family, proto, verdict, address, b"curl\0garbage")


def test_parse_event_ipv4() -> None:
    event = parse_event(record(2, 6, 1, bytes([10, 77, 0, 3]) + bytes(12)))
    assert (event.ts_ns, event.pid, event.uid, event.family, event.proto) == (5, 42, 1500, 4, "tcp")
    assert (event.verdict, event.address, event.port, event.comm) == ("deny", "10.77.0.3", 443, "curl")


def test_parse_event_ipv6_and_v4_mapped() -> None:
    assert parse_event(record(10, 17, 2, bytes.fromhex("fd77" + "00" * 13 + "03"))).address == "fd77::3"
    mapped = parse_event(record(10, 6, 3, bytes(10) + b"\xff\xff" + bytes([8, 8, 8, 8]), port=53))
    assert (mapped.family, mapped.address, mapped.verdict, mapped.proto) == (6, "8.8.8.8", "redirect", "tcp")
