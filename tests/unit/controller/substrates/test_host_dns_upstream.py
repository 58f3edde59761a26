"""Which upstream a local sandbox is told to use when the operator names none (KM_LOCAL_DNS_UPSTREAM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.substrates.local.substrate import host_dns_upstream


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("nameserver 10.255.255.53\n", "10.255.255.53"),
        ("search example.internal\nnameserver 127.0.0.53\nnameserver 192.0.2.53\n", "192.0.2.53"),  # a stub is no use
        ("nameserver 127.0.0.53\n", None),
        ("# nothing\n", None),
        ("nameserver not-an-address\nnameserver 2001:db8::53\n", "2001:db8::53"),
    ],
)
def test_the_hosts_first_reachable_nameserver(tmp_path: Path, content: str, expected: str | None) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(content)
    assert host_dns_upstream(resolv_conf) == expected


def test_no_resolv_conf_names_nothing(tmp_path: Path) -> None:
    assert host_dns_upstream(tmp_path / "missing") is None
