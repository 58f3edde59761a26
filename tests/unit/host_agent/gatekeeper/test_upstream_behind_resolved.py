"""The host agent's upstream on an image with systemd-resolved: never resolved's own stub (that would
make resolved the sandbox's resolver), but the server resolved forwards to."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.gatekeeper.component import GateError, upstream_from_resolv_conf

STUB = "# managed by systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
UPLINK = "# uplink\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch ec2.internal\n"


def test_behind_the_stub_the_upstream_is_resolveds_uplink_server(tmp_path: Path) -> None:
    resolv_conf, uplink = tmp_path / "resolv.conf", tmp_path / "uplink.conf"
    resolv_conf.write_text(STUB)
    uplink.write_text(UPLINK)
    assert upstream_from_resolv_conf(resolv_conf, uplink) == ("10.0.0.2", 53)


def test_a_link_to_resolveds_stub_file_that_is_gone_still_finds_the_uplink(tmp_path: Path) -> None:
    resolv_conf, uplink = tmp_path / "resolv.conf", tmp_path / "uplink.conf"
    resolv_conf.symlink_to(tmp_path / "run/systemd/resolve/stub-resolv.conf")
    uplink.write_text(UPLINK)
    assert upstream_from_resolv_conf(resolv_conf, uplink) == ("10.0.0.2", 53)


def test_the_stub_alone_is_no_upstream(tmp_path: Path) -> None:
    resolv_conf, uplink = tmp_path / "resolv.conf", tmp_path / "uplink.conf"
    resolv_conf.write_text(STUB + "nameserver 127.0.0.54\n")
    with pytest.raises(GateError, match="KM_DNS_UPSTREAM"):
        upstream_from_resolv_conf(resolv_conf, uplink)
    uplink.write_text("nameserver 127.0.0.53\n")
    with pytest.raises(GateError, match="KM_DNS_UPSTREAM"):
        upstream_from_resolv_conf(resolv_conf, uplink)


def test_a_plain_resolv_conf_is_taken_as_it_is(tmp_path: Path) -> None:
    """What first boot writes once resolved is masked; a stale uplink file is not consulted."""
    resolv_conf, uplink = tmp_path / "resolv.conf", tmp_path / "uplink.conf"
    uplink.write_text("nameserver 10.9.9.9\n")
    resolv_conf.write_text("# km\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n")
    assert upstream_from_resolv_conf(resolv_conf, uplink) == ("10.0.0.2", 53)
    resolv_conf.write_text("search example\n")
    with pytest.raises(GateError):
        upstream_from_resolv_conf(resolv_conf, uplink)
