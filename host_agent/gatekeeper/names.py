"""Which DNS names a sandbox may resolve: the allowlist decision the resolver makes for every query.

Pure and kernel-free, so it is table- and property-tested on its own; the resolver asks it before it
forwards anything upstream (a denied name never leaves the sandbox, so it cannot carry data out).

Rules (issue 5): a suffix `.github.com` or `github.com` matches `github.com` and every name below it,
never `evilgithub.com`; `*` matches every name; `allowedHosts` match exactly. Comparison is on the
normalised form (lower-case IDNA A-labels, no trailing dot), the form `host-agent.json` already holds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from host_agent.dnsnames import normalise_dns_name

WILDCARD = "*"
MAX_NAME_LENGTH = 253  # RFC 1035, without the trailing dot


@dataclass(frozen=True)
class NamePolicy:
    suffixes: frozenset[str]
    hosts: frozenset[str]
    allow_all: bool

    @classmethod
    def from_lists(cls, allowed_dns_suffixes: Iterable[str], allowed_hosts: Iterable[str]) -> NamePolicy:
        suffixes = [s for s in (_normalised(entry) for entry in allowed_dns_suffixes if entry != WILDCARD) if s]
        hosts = [h for h in (_normalised(entry) for entry in allowed_hosts) if h]
        return cls(frozenset(suffixes), frozenset(hosts), WILDCARD in allowed_dns_suffixes)

    def allows(self, queried: str) -> bool:
        """Whether a query for this name (as it came off the wire) may be answered from upstream."""
        name = _normalised(queried)
        if not name:
            return False
        if self.allow_all or name in self.hosts:
            return True
        labels = name.split(".")
        # Every suffix of the name on a label boundary: a.b.c → a.b.c, b.c, c.
        return any(".".join(labels[index:]) in self.suffixes for index in range(len(labels)))


# A host name already in A-label form: every query off the wire, so IDNA processing can be skipped.
_LDH_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@functools.lru_cache(maxsize=4096)
def _normalised(text: str) -> str:
    """The comparison form, or "" for anything that is not a valid DNS name (it then matches nothing).

    Cached, and plain lower-casing for names that are already ASCII letters, digits and hyphens:
    this runs for every DNS query, and full IDNA processing costs a tenth of a millisecond.
    """
    candidate = text.strip().lstrip(".").rstrip(".")
    if not candidate or len(candidate) > MAX_NAME_LENGTH:
        return ""
    lowered = candidate.lower()
    if _LDH_NAME.fullmatch(lowered) and "--" not in lowered.replace("xn--", ""):
        return lowered
    try:
        return normalise_dns_name(candidate)
    except (UnicodeError, ValueError):
        return ""
