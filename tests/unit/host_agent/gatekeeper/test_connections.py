"""Open TCP connections as /proc/net/tcp{,6} shows them: the parser row by row, then real sockets on loopback."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from host_agent.gatekeeper.connections import decode_address, open_remote_addresses, parse_socket_line

V4_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
V4_ESTABLISHED = (
    "   3: 0100007F:9C40 0201000A:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000 20 4 30 10 -1"
)
V4_LISTEN = "   0: 00000000:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1061 1 0000 100 0 0 10 0"
V6_SYN_SENT = (
    "   1: 00000000000000000000000001000000:9C41 B80D0120000000000000000001000000:01BB 02 "
    "00000001:00000000 01:00000064 00000000  1000        0 4243 1 0000 20 4 30 10 -1"
)
V6_MAPPED_CLOSE_WAIT = (
    "   2: 0000000000000000FFFF00000100007F:9C42 0000000000000000FFFF00000502000A:0050 08 "
    "00000000:00000000 00:00000000 00000000  1000        0 4244 1 0000 20 4 30 10 -1"
)
V6_TIME_WAIT = (
    "   3: 00000000000000000000000001000000:9C43 B80D0120000000000000000002000000:01BB 06 "
    "00000000:00000000 03:00000064 00000000     0        0 0 3 0000"
)

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="the sample rows were printed by a little-endian kernel"
)


@little_endian_only
@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (V4_HEADER, None),
        ("", None),
        ("   9: garbage", None),
        ("   9: 0100007F:9C40 XYZ:01BB 01 00000000:00000000", None),
        ("   9: 0100007F:9C40 0201000A:01BB zz 00000000:00000000", None),
        (V4_ESTABLISHED, ("10.0.1.2", 0x01)),
        (V4_LISTEN, ("0.0.0.0", 0x0A)),
        (V6_SYN_SENT, ("2001:db8::1", 0x02)),
        (V6_MAPPED_CLOSE_WAIT, ("10.0.2.5", 0x08)),  # v4-mapped: reported as the IPv4 address
        (V6_TIME_WAIT, ("2001:db8::2", 0x06)),
    ],
)
def test_parse_socket_line(line: str, parsed: tuple[str, int] | None) -> None:
    assert parse_socket_line(line) == parsed


@pytest.mark.parametrize("text", ["", "0100007F0", "0100007F0100007F", "ZZZZZZZZ"])
def test_decode_address_rejects_what_is_not_an_address(text: str) -> None:
    with pytest.raises(ValueError):
        decode_address(text)


@little_endian_only
def test_only_open_states_count(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text("\n".join([V4_HEADER, V4_ESTABLISHED, V4_LISTEN]) + "\n")
    (tmp_path / "tcp6").write_text("\n".join([V4_HEADER, V6_SYN_SENT, V6_MAPPED_CLOSE_WAIT, V6_TIME_WAIT]) + "\n")
    assert open_remote_addresses(tmp_path) == {"10.0.1.2", "2001:db8::1", "10.0.2.5"}


def test_a_missing_tcp6_table_is_no_error(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(V4_HEADER + "\n")
    assert open_remote_addresses(tmp_path) == set()


def _private_loopback() -> str:
    """A loopback address of this test's own, so other connections on 127.0.0.1 cannot confuse it."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def _connected_pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2], timeout=2)
    accepted, _ = listener.accept()
    return listener, client, accepted


def test_a_real_connection_is_seen_and_disappears_once_closed() -> None:
    server = _private_loopback()
    listener, client, accepted = _connected_pair(socket.AF_INET, server)
    try:
        assert server in open_remote_addresses()
    finally:
        listener.close()
        client.close()
        accepted.close()
    assert server not in open_remote_addresses()  # both ends closed: TIME_WAIT / gone, not open


def test_a_real_ipv6_connection_is_seen() -> None:
    try:
        listener, client, accepted = _connected_pair(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert "::1" in open_remote_addresses()
    finally:
        listener.close()
        client.close()
        accepted.close()
