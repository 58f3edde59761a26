"""The allow table's bookkeeping with a fake clock and a recording sink: what reaches the kernel maps, and when it leaves."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from host_agent.gatekeeper.allow_table import (
    PRIVATE_NETWORKS,
    AllowTable,
    StalePolicy,
    canonical_network,
    unlearnable_range,
)


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.kinds: dict[str, str] = {}
        self.present: set[str] = set()
        self.fail_revoke: set[str] = set()

    def allow(self, network: str, *, static: bool = False) -> None:
        self.calls.append(("allow-static" if static else "allow", network))
        self.present.add(network)
        self.kinds[network] = "static" if static else "learned"

    def revoke(self, network: str) -> None:
        if network in self.fail_revoke:
            raise OSError("map update failed")
        self.calls.append(("revoke", network))
        self.present.discard(network)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_learn_allows_new_addresses_once(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.learn([("198.51.100.1", 300), ("2001:DB8::0:1", 300)], epoch=0)
    table.learn([("198.51.100.1", 300), ("::ffff:198.51.100.1", 300)], epoch=0)  # the same kernel entry, however spelled
    assert sink.calls == [("allow", "198.51.100.1"), ("allow", "2001:db8::1")]


def test_learn_rejects_what_is_not_an_address(sink: RecordingSink, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        AllowTable(sink, clock=clock).learn([("10.0.0.0/8", 300)], epoch=0)


@pytest.mark.parametrize(("ttl", "lifetime"), [(1, 60), (0, 60), (-5, 60), (60, 60), (300, 300)])
def test_expiry_is_the_larger_of_ttl_and_floor(sink: RecordingSink, clock: FakeClock, ttl: int, lifetime: int) -> None:
    table = AllowTable(sink, floor_seconds=60, clock=clock)
    table.learn([("198.51.100.1", ttl)], epoch=0)
    assert table.snapshot() == {"198.51.100.1": clock.now + lifetime}


def test_expire_revokes_through_the_sink_only_when_due(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, floor_seconds=60, clock=clock)
    table.learn([("198.51.100.1", 10), ("198.51.100.2", 300)], epoch=0)
    clock.now += 59
    assert table.expire() == []
    clock.now += 1
    assert table.expire() == ["198.51.100.1"]
    assert sink.present == {"198.51.100.2"}
    assert set(table.snapshot()) == {"198.51.100.2"}
    clock.now += 240
    assert table.expire() == ["198.51.100.2"]
    assert sink.present == set() and table.snapshot() == {}


def test_a_relearned_address_is_allowed_again_after_expiring(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.learn([("198.51.100.1", 1)], epoch=0)
    clock.now += 61
    table.expire()
    table.learn([("198.51.100.1", 1)], epoch=0)
    assert sink.calls == [("allow", "198.51.100.1"), ("revoke", "198.51.100.1"), ("allow", "198.51.100.1")]


def test_learning_again_extends_but_never_shortens(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, floor_seconds=60, clock=clock)
    table.learn([("198.51.100.1", 300)], epoch=0)
    clock.now += 100
    table.learn([("198.51.100.1", 1)], epoch=0)  # a shorter answer later: still 300 from the first
    assert table.snapshot() == {"198.51.100.1": 1300.0}
    clock.now += 150
    table.learn([("198.51.100.1", 300)], epoch=0)  # a longer one: extended
    assert table.snapshot() == {"198.51.100.1": 1550.0}


def test_in_use_addresses_survive_expiry_until_closed(sink: RecordingSink, clock: FakeClock) -> None:
    open_connections = {"198.51.100.1"}
    probes: list[int] = []

    def in_use() -> set[str]:
        probes.append(1)
        return set(open_connections)

    table = AllowTable(sink, clock=clock, is_in_use=in_use)
    table.learn([("198.51.100.1", 1), ("198.51.100.2", 1), ("198.51.100.3", 1)], epoch=0)
    assert table.expire() == [] and probes == []  # nothing due: /proc is not read at all
    clock.now += 61
    assert table.expire() == ["198.51.100.2", "198.51.100.3"]
    assert probes == [1]  # read once per pass, not once per address
    assert sink.present == {"198.51.100.1"}
    assert table.expire() == []
    open_connections.clear()
    assert table.expire() == ["198.51.100.1"]
    assert sink.present == set()


def test_when_open_connections_cannot_be_listed_expiry_errs_towards_revoking(sink: RecordingSink, clock: FakeClock) -> None:
    def broken() -> set[str]:
        raise OSError("no /proc")

    table = AllowTable(sink, clock=clock, is_in_use=broken)
    table.learn([("198.51.100.1", 1)], epoch=0)
    clock.now += 61
    assert table.expire() == ["198.51.100.1"]


def test_a_failed_revoke_is_retried_on_the_next_pass(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.learn([("198.51.100.1", 1), ("198.51.100.2", 1)], epoch=0)
    sink.fail_revoke.add("198.51.100.1")
    clock.now += 61
    assert table.expire() == ["198.51.100.2"]
    assert "198.51.100.1" in table.snapshot()
    sink.fail_revoke.clear()
    assert table.expire() == ["198.51.100.1"]


def test_static_networks_never_expire(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.set_static(["192.168.0.0/16", "10.9.9.9/32", "2001:db8::/32"])
    clock.now += 10**9
    assert table.expire() == []
    assert table.snapshot() == {"192.168.0.0/16": None, "10.9.9.9": None, "2001:db8::/32": None}
    assert sink.present == {"192.168.0.0/16", "10.9.9.9", "2001:db8::/32"}


def test_replacing_the_static_set_revokes_removed_networks_only(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.set_static(["192.168.0.0/16", "172.16.0.0/12"])
    sink.calls.clear()
    table.set_static(["172.16.0.0/12", "10.0.0.0/8"])
    assert sink.calls == [("allow-static", "10.0.0.0/8"), ("revoke", "192.168.0.0/16")]
    assert set(table.snapshot()) == {"172.16.0.0/12", "10.0.0.0/8"}


def test_a_bad_static_network_changes_nothing(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    table.set_static(["192.168.0.0/16"])
    with pytest.raises(ValueError):
        table.set_static(["10.0.0.0/8", "not-a-network"])
    assert table.snapshot() == {"192.168.0.0/16": None}


def test_a_learned_address_that_is_also_static_shares_one_kernel_entry(sink: RecordingSink, clock: FakeClock) -> None:
    """Expiry of the learned copy must not revoke the static entry; removing the static one leaves the learned one."""
    table = AllowTable(sink, clock=clock)
    table.set_static(["198.51.100.1/32"])
    table.learn([("198.51.100.1", 1)], epoch=0)
    clock.now += 61
    assert table.expire() == []
    assert sink.present == {"198.51.100.1"} and sink.calls == [("allow-static", "198.51.100.1")]

    table.learn([("198.51.100.1", 300)], epoch=0)
    table.set_static([])
    assert sink.present == {"198.51.100.1"}  # still learned, so still allowed
    assert sink.kinds["198.51.100.1"] == "learned"  # and no longer reached directly in the proxy modes
    assert table.snapshot() == {"198.51.100.1": clock.now + 300}
    clock.now += 300
    assert table.expire() == ["198.51.100.1"] and sink.present == set()


def test_clear_dynamic_revokes_every_learned_entry_but_keeps_static(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock, is_in_use=lambda: {"198.51.100.1"})
    table.set_static(["192.168.0.0/16"])
    table.learn([("198.51.100.1", 300), ("198.51.100.2", 300)], epoch=0)
    published: list[tuple[int, set[str]]] = []

    revoked = table.clear_dynamic(lambda epoch: published.append((epoch, set(sink.present))))

    assert revoked == ["198.51.100.1", "198.51.100.2"]  # in use or not: the names behind them are gone
    assert sink.present == {"192.168.0.0/16"}
    assert table.snapshot() == {"192.168.0.0/16": None}
    assert published == [(1, {"192.168.0.0/16", "198.51.100.1", "198.51.100.2"})]  # the new epoch, before the revoke
    assert table.epoch == 1


def test_an_answer_judged_before_a_narrowing_is_refused_whole(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)
    judged_in = table.epoch
    table.clear_dynamic(lambda _epoch: None)

    with pytest.raises(StalePolicy):
        table.learn([("198.51.100.1", 300)], epoch=judged_in)

    assert sink.calls == [] and table.snapshot() == {}
    table.learn([("198.51.100.1", 300)], epoch=table.epoch)
    assert sink.present == {"198.51.100.1"}


def test_a_learn_already_writing_when_the_narrowing_comes_is_revoked_with_the_rest(clock: FakeClock) -> None:
    """The race the lock closes: an answer checked against the old epoch and then written after the revoke."""
    inside_allow, finish_allow = threading.Event(), threading.Event()

    class SlowSink(RecordingSink):
        def allow(self, network: str, *, static: bool = False) -> None:
            super().allow(network, static=static)
            inside_allow.set()
            finish_allow.wait(10)

    sink = SlowSink()
    table = AllowTable(sink, clock=clock)
    learning = threading.Thread(target=table.learn, args=([("198.51.100.1", 300)],), kwargs={"epoch": 0})
    learning.start()
    assert inside_allow.wait(10)
    narrowing = threading.Thread(target=table.clear_dynamic, args=(lambda _epoch: finish_allow.set(),))
    narrowing.start()  # waits for the learn to finish; its publish then lets a lock-free learn go on
    finish_allow.set()
    learning.join(10)
    narrowing.join(10)

    assert sink.present == set()
    assert sink.calls == [("allow", "198.51.100.1"), ("revoke", "198.51.100.1")]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits are dropped, as the kernel's LPM key would
        ("10.1.2.3/32", "10.1.2.3"),
        ("10.1.2.3", "10.1.2.3"),
        ("2001:DB8:0::1/128", "2001:db8::1"),
        (" 2001:db8::/32 ", "2001:db8::/32"),
        ("::ffff:10.1.2.3", "10.1.2.3"),  # v4-mapped: the gate keeps it in the IPv4 trie
        ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
    ],
)
def test_canonical_network(text: str, canonical: str) -> None:
    assert canonical_network(text) == canonical


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "169.254.1.1", "fe80::1", "127.0.0.1", "::1", "0.0.0.0", "224.0.0.1", "::ffff:169.254.169.254"]
)
def test_answers_pointing_at_non_routable_addresses_are_never_learned(
    sink: RecordingSink, clock: FakeClock, address: str
) -> None:
    table = AllowTable(sink, clock=clock)

    table.learn([(address, 300), ("198.51.100.1", 300)], epoch=0)

    assert sink.present == {"198.51.100.1"}


def test_adopted_entries_live_for_the_floor_and_static_ones_leave_when_no_longer_configured(
    sink: RecordingSink, clock: FakeClock
) -> None:
    table = AllowTable(sink, clock=clock)

    assert table.adopt({"10.1.0.1/32": False, "192.168.0.0/16": True, "10.9.0.0/16": True}) == []
    table.set_static(["10.9.0.0/16"])

    assert sink.calls == [("revoke", "192.168.0.0/16")]  # nothing else touched the kernel
    assert table.snapshot() == {"10.1.0.1": clock.now + 60, "10.9.0.0/16": None}
    clock.now += 60
    assert table.expire() == ["10.1.0.1"]


def test_adopting_after_the_allowlist_changed_revokes_the_learned_entries(sink: RecordingSink, clock: FakeClock) -> None:
    table = AllowTable(sink, clock=clock)

    assert table.adopt({"10.1.0.1/32": False, "10.9.0.0/16": True}, keep_learned=False) == ["10.1.0.1"]
    assert table.snapshot() == {"10.9.0.0/16": None}


@pytest.mark.parametrize(
    ("address", "address_range"),
    [
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("100.127.255.254", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
    ],
)
def test_answers_in_private_and_local_ranges_are_refused_and_say_why(
    sink: RecordingSink, clock: FakeClock, address: str, address_range: str
) -> None:
    table = AllowTable(sink, clock=clock)

    refused = table.learn([(address, 300), ("198.51.100.1", 300)], epoch=0)

    assert refused == [(canonical_network(address), address_range)]
    assert sink.present == {"198.51.100.1"}


@pytest.mark.parametrize(
    "address",
    # Neighbours of the private ranges, and ranges `ipaddress.is_private` would wrongly count (TEST-NETs, benchmarking).
    ["172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0", "11.0.0.1", "192.169.0.1", "fe00::1"]
    + ["192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1", "198.19.255.1", "2001:db8::1", "2606:4700::1"],
)
def test_public_addresses_are_learned(sink: RecordingSink, clock: FakeClock, address: str) -> None:
    table = AllowTable(sink, clock=clock)

    assert table.learn([(address, 300)], epoch=0) == []
    assert sink.present == {canonical_network(address)}
    assert unlearnable_range(ipaddress.ip_address(address)) is None


def test_the_private_list_is_exactly_the_one_documented() -> None:
    assert [str(network) for network in PRIVATE_NETWORKS] == [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]


def test_a_private_answer_inside_allowed_cidrs_is_reachable_through_them_and_not_reported(
    sink: RecordingSink, clock: FakeClock
) -> None:
    table = AllowTable(sink, clock=clock)
    table.set_static(["10.20.0.0/16", "fd00:20::/64"])

    refused = table.learn([("10.20.1.1", 300), ("fd00:20::5", 300), ("10.21.0.1", 300)], epoch=0)

    assert refused == [("10.21.0.1", "private")]
    assert sink.present == {"10.20.0.0/16", "fd00:20::/64"}  # nothing learned: the static entries already cover them
    assert table.unreachable_range(ipaddress.ip_address("10.20.9.9")) is None
    assert table.unreachable_range(ipaddress.ip_address("10.21.0.1")) == "private"
    assert table.unreachable_range(ipaddress.ip_address("198.51.100.1")) is None
    table.set_static([])
    assert table.unreachable_range(ipaddress.ip_address("10.20.9.9")) == "private"
