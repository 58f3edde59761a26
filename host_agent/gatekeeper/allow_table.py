"""Which addresses the sandbox may reach right now, and when each stops being reachable.

The resolver learns addresses from allowed DNS answers; the profile's allowedCIDRs are static. This
table is the bookkeeping between the two and the kernel's allow maps (the sink): an address enters the
sink before `learn` returns (so the resolver can reply only after the kernel lets the connection out),
and leaves it once it expires, unless a connection to it is still open (cutting live connections
whenever a short DNS TTL runs out would break every long download).

Two rules keep a DNS answer from opening more than the policy means. An answer is learned only in the
policy epoch it was judged in: narrowing the allowlist starts a new epoch and revokes what was learned,
atomically, so an answer computed under the old policy can never write the map afterwards. And an answer
pointing into a private, loopback, link-local, multicast or unspecified range is never learned (DNS
rebinding: an allowed public name must not point the agent at the host, the LAN or another sandbox);
allowedCIDRs are the only way there.

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
# Where no public name should point: RFC 1918, shared address space (RFC 6598: carrier NAT, some clouds'
# internal ranges) and IPv6 unique-local. Deliberately not `ipaddress.is_private`, which also covers
# documentation and benchmarking ranges.
PRIVATE_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network) for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


class StalePolicy(Exception):
    """The policy an answer was judged under was narrowed since; nothing of the answer was learned."""


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def never_learned(address: IPAddress) -> bool:
    """Addresses a DNS answer must never open: link-local (instance metadata lives there), loopback,
    multicast and unspecified. An allowed name pointing at 169.254.169.254 (DNS rebinding, or a wildcard
    suffix) would otherwise hand the agent the machine's credentials."""
    address = _unmapped(address)
    return address.is_link_local or address.is_loopback or address.is_multicast or address.is_unspecified


def unlearnable_range(address: IPAddress) -> str | None:
    """The kind of range that keeps a DNS answer's address from being learned (`private`, `loopback`,
    `link-local`, `multicast`, `unspecified`), or None for an address an allowed name may open."""
    address = _unmapped(address)
    if address.is_link_local:
        return "link-local"
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if any(address in network for network in PRIVATE_NETWORKS):
        return "private"
    return None


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
        self._epoch = 0
        self._lock = threading.RLock()

    @property
    def epoch(self) -> int:
        """The policy epoch an answer must have been judged in to be learned; `clear_dynamic` starts the next."""
        with self._lock:
            return self._epoch

    def learn(self, addresses: Iterable[tuple[str, int]], *, epoch: int) -> list[tuple[str, str]]:
        """Allow each (address, TTL) from a DNS answer judged in policy `epoch`; new ones reach the sink before
        this returns. Returns the (address, range) pairs left closed (see `unreachable_range`).

        Raises StalePolicy, learning nothing, when the policy was narrowed since the answer was judged. An
        entry's expiry only ever moves later: a short TTL from one answer never cuts a longer one.
        """
        parsed = [(ipaddress.ip_address(text.strip()), ttl) for text, ttl in addresses]
        refused: list[tuple[str, str]] = []
        with self._lock:
            if epoch != self._epoch:
                raise StalePolicy(f"judged in policy epoch {epoch}, now {self._epoch}")
            now = self.clock()
            for address, ttl in parsed:
                key = canonical_network(str(address))
                if unlearnable_range(address) is not None:
                    # Never learned. An allowedCIDRs entry covering it reaches it already (loopback is never
                    # gated); anything else stays closed, and the caller is told why.
                    reason = self._unreachable_range(address)
                    if reason is not None:
                        log.warning(
                            "a DNS answer pointed into a range names may not open; not allowed",
                            extra={"fields": {"address": key, "range": reason}},
                        )
                        refused.append((key, reason))
                    continue
                expiry = now + max(ttl, self.floor_seconds)
                if key not in self._learned and key not in self._static:
                    self.sink.allow(key)
                self._learned[key] = max(expiry, self._learned.get(key, expiry))
        return refused

    def unreachable_range(self, address: IPAddress) -> str | None:
        """Why an answer's address stays closed although its name is allowed: its range (`unlearnable_range`)
        when no allowedCIDRs entry covers it; None when the address may be reached."""
        with self._lock:
            return self._unreachable_range(address)

    def _unreachable_range(self, address: IPAddress) -> str | None:
        reason = unlearnable_range(address)
        if reason is None:
            return None
        address = _unmapped(address)
        if any(address in ipaddress.ip_network(network) for network in self._static):
            return None
        return reason

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

    def clear_dynamic(self, publish: Callable[[int], None]) -> list[str]:
        """Start a new policy epoch and revoke every learned entry (a reload removed names, or learn mode
        ended); returns those revoked.

        `publish(epoch)` runs under the table's lock before anything is revoked: it hands the new policy and
        epoch to the resolver, so an answer judged under the old policy was either learned before the revoke
        (and goes with the rest) or is refused as stale and judged again under the new policy.
        Open connections are not spared: an address learned through a name that is no longer allowed
        must not stay reachable for new connections, and the table cannot tell old from new ones.
        """
        with self._lock:
            self._epoch += 1
            publish(self._epoch)
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
