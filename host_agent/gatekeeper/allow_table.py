"""Which addresses the sandbox may reach right now, and when each stops being reachable.

The resolver learns addresses from allowed DNS answers; the profile's allowedCIDRs are static. This
table is the bookkeeping between the two and the kernel's allow maps (the sink): an address enters the
sink before `learn` returns (so the resolver can reply only after the kernel lets the connection out),
and leaves it once it expires, unless a connection to it is still open (cutting live connections
whenever a short DNS TTL runs out would break every long download).

Kept free of sockets and BPF so it is tested with a fake clock and a recording sink.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Protocol

log = logging.getLogger("km-host-agent.gate.table")

DEFAULT_FLOOR_SECONDS = 60


class AllowSink(Protocol):
    """Where entries really take effect: the BPF gate's allow maps (or a recording fake in tests)."""

    def allow(self, network: str, *, static: bool = False) -> None:
        """`static`: an allowedCIDRs entry (reached directly even in the proxy modes), else a learned one."""

    def revoke(self, network: str) -> None: ...


def _nothing_in_use() -> AbstractSet[str]:
    return frozenset()


def canonical_network(text: str) -> str:
    """One spelling per kernel entry, so a learned address expiring never revokes a static entry sharing its slot.

    Mirrors how the gate keys its tries: host bits cleared, `10.0.0.5/32` is `10.0.0.5`, and v4-mapped
    IPv6 (`::ffff:10.0.0.5`) is the IPv4 entry. It is also how connections.py spells remote addresses.
    """
    network: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(text.strip(), strict=False)
    mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def never_learned(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses a DNS answer must never open: link-local (instance metadata lives there), loopback,
    multicast and unspecified. An allowed name pointing at 169.254.169.254 (DNS rebinding, or a wildcard
    suffix) would otherwise hand the agent the machine's credentials."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address.is_loopback or address.is_multicast or address.is_unspecified


class AllowTable:
    """Static networks (never expire) plus learned addresses (expire after max(TTL, floor)).

    `is_in_use` returns the set of remote addresses with an open connection; it is called at most once
    per `expire()` and only when something is due, because reading /proc/net/tcp costs more than the
    comparison (the daemon passes `connections.open_remote_addresses`). If it fails, nothing is treated
    as in use: the table errs towards revoking.

    Thread-safe: resolver threads learn while the daemon's loop expires.
    """

    def __init__(
        self,
        sink: AllowSink,
        *,
        floor_seconds: int = DEFAULT_FLOOR_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        is_in_use: Callable[[], AbstractSet[str]] = _nothing_in_use,
    ) -> None:
        self.sink = sink
        self.floor_seconds = floor_seconds
        self.clock = clock
        self.is_in_use = is_in_use
        self._static: set[str] = set()
        self._learned: dict[str, float] = {}
        self._lock = threading.RLock()

    def learn(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Allow each (address, TTL) from a DNS answer; new ones reach the sink before this returns.

        An entry's expiry only ever moves later: a short TTL from one answer never cuts a longer one.
        """
        with self._lock:
            now = self.clock()
            for text, ttl in addresses:
                address = ipaddress.ip_address(text.strip())
                if never_learned(address):
                    log.warning(
                        "a DNS answer pointed at a non-routable address; not allowed", extra={"fields": {"address": str(address)}}
                    )
                    continue
                key = canonical_network(str(address))
                expiry = now + max(ttl, self.floor_seconds)
                if key not in self._learned and key not in self._static:
                    self.sink.allow(key)
                self._learned[key] = max(expiry, self._learned.get(key, expiry))

    def adopt(self, entries: Mapping[str, bool], *, keep_learned: bool = True) -> list[str]:
        """Take over what a previous daemon left in the kernel's maps (CIDR → static); returns revoked entries.

        Learned entries get the floor as their remaining life (their TTLs died with that daemon), or are
        revoked at once when `keep_learned` is False (the allowlist changed while no daemon ran). Static
        ones are recorded so that the next `set_static` revokes those no longer configured.
        """
        with self._lock:
            expiry = self.clock() + self.floor_seconds
            revoked: list[str] = []
            for network, static in entries.items():
                key = canonical_network(network)
                if static:
                    self._static.add(key)
                elif keep_learned:
                    self._learned[key] = max(expiry, self._learned.get(key, expiry))
                else:
                    self.sink.revoke(key)
                    revoked.append(key)
            return revoked

    def set_static(self, networks: Iterable[str]) -> None:
        """Replace the allowedCIDRs: new ones are allowed, removed ones revoked (unless still learned).

        Every network is parsed before anything changes, so a bad entry leaves the table as it was.
        """
        wanted = {canonical_network(network) for network in networks}
        with self._lock:
            for key in sorted(wanted - self._static):
                self.sink.allow(key, static=True)
                self._static.add(key)
            for key in sorted(self._static - wanted):
                if key in self._learned:
                    self.sink.allow(key)  # still reachable, now as a learned entry
                else:
                    self.sink.revoke(key)
                self._static.discard(key)

    def expire(self) -> list[str]:
        """Revoke learned entries past their expiry that no open connection uses; returns those revoked.

        A revoke the sink refuses is logged and retried on the next call, never left half-done.
        """
        with self._lock:
            now = self.clock()
            due = sorted(key for key, expiry in self._learned.items() if expiry <= now)
            if not due:
                return []
            try:
                in_use = self.is_in_use()
            except Exception:
                log.exception("could not list open connections; expiring as if none were open")
                in_use = frozenset()
            revoked: list[str] = []
            for key in due:
                if key in in_use:
                    continue
                if key not in self._static:
                    try:
                        self.sink.revoke(key)
                    except Exception:
                        log.exception(
                            "revoking an expired address failed; retrying next pass", extra={"fields": {"address": key}}
                        )
                        continue
                    revoked.append(key)
                del self._learned[key]
            return revoked

    def clear_dynamic(self) -> list[str]:
        """Revoke every learned entry at once (a reload removed names); returns those revoked.

        Open connections are not spared: an address learned through a name that is no longer allowed
        must not stay reachable for new connections, and the table cannot tell old from new ones.
        """
        with self._lock:
            revoked: list[str] = []
            for key in sorted(self._learned):
                if key not in self._static:
                    self.sink.revoke(key)
                    revoked.append(key)
                del self._learned[key]
            return revoked

    def snapshot(self) -> dict[str, float | None]:
        """Every entry in the sink and when it expires (None: static, never)."""
        with self._lock:
            entries: dict[str, float | None] = {key: expiry for key, expiry in self._learned.items()}
            entries.update(dict.fromkeys(self._static))
            return entries
