"""The gatekeeper's small readers: where cgroup v2 is mounted, and which upstream the resolver uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.gatekeeper.component import GateError, cgroup2_root, parse_upstream, upstream_from_resolv_conf

HYBRID = (
    "24 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
    "25 24 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
    "26 24 0:24 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd\n"
)
PURE = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


@pytest.mark.parametrize(("mountinfo", "expected"), [(HYBRID, "/sys/fs/cgroup/unified"), (PURE, "/sys/fs/cgroup")])
def test_cgroup2_root_is_read_from_mountinfo(tmp_path: Path, mountinfo: str, expected: str) -> None:
    file = tmp_path / "mountinfo"
    file.write_text(mountinfo)
    assert cgroup2_root(file) == Path(expected)


def test_no_cgroup2_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "mountinfo"
    file.write_text(HYBRID.splitlines()[2] + "\n")
    with pytest.raises(GateError, match="cgroup v2"):
        cgroup2_root(file)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.19.0.2", ("198.19.0.2", 53)),
        ("198.19.0.2:5353", ("198.19.0.2", 5353)),
        ("fd15::2", ("fd15::2", 53)),
        ("[fd15::2]:5353", ("fd15::2", 5353)),
        (" 1.1.1.1 ", ("1.1.1.1", 53)),
    ],
)
def test_parse_upstream(text: str, expected: tuple[str, int]) -> None:
    assert parse_upstream(text) == expected


def test_a_name_is_not_an_upstream() -> None:
    with pytest.raises(ValueError):
        parse_upstream("dns.example")


def test_upstream_from_resolv_conf_takes_the_first_nameserver(tmp_path: Path) -> None:
    file = tmp_path / "resolv.conf"
    file.write_text("# generated\nsearch example\nnameserver 10.255.255.53\nnameserver 10.0.0.2\n")
    assert upstream_from_resolv_conf(file) == ("10.255.255.53", 53)
    file.write_text("search example\n")
    with pytest.raises(GateError, match="no nameserver"):
        upstream_from_resolv_conf(file)
