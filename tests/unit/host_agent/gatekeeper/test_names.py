"""The DNS-name allowlist decision, one row per rule, plus properties over generated names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.gatekeeper.names import NamePolicy

POLICY = NamePolicy.from_lists([".allowed.test", "github.com", "straße.de"], ["exact.example.org"])

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("allowed.test", True),  # the suffix itself
        ("api.allowed.test", True),
        ("a.b.c.allowed.test", True),
        ("evilallowed.test", False),  # not on a label boundary
        ("allowed.test.evil.test", False),
        ("API.Allowed.TEST", True),  # case-insensitive
        ("api.allowed.test.", True),  # trailing dot
        ("github.com", True),  # a suffix written without the leading dot
        ("evilgithub.com", False),
        ("raw.githubusercontent.com", False),
        ("exact.example.org", True),  # allowedHosts: exactly
        ("sub.exact.example.org", False),
        ("example.org", False),
        ("xn--strae-oqa.de", True),  # IDNA 2008: ß is its own A-label, not "ss"
        ("www.straße.de", True),
        ("strasse.de", False),
        ("", False),
        (".", False),
        ("a..allowed.test", False),  # malformed: matches nothing rather than crashing
        ("x" * 300 + ".allowed.test", False),
        ("bad_label!.allowed.test", False),
    ],
)
def test_each_rule(name: str, allowed: bool) -> None:
    assert POLICY.allows(name) is allowed


def test_star_allows_every_valid_name_but_not_garbage() -> None:
    everything = NamePolicy.from_lists(["*"], [])
    assert everything.allows("anything.example") and everything.allows("localhost")
    assert not everything.allows("")


def test_an_empty_policy_allows_nothing() -> None:
    assert not NamePolicy.from_lists([], []).allows("allowed.test")


@given(st.lists(LABEL, min_size=1, max_size=4))
def test_every_name_below_an_allowed_suffix_is_allowed(labels: list[str]) -> None:
    assert POLICY.allows(".".join([*labels, "allowed", "test"]))


@given(LABEL.filter(lambda label: label != "allowed"))
def test_a_label_glued_onto_the_suffix_is_never_allowed(label: str) -> None:
    assert not POLICY.allows(f"{label}allowed.test")


@given(st.lists(LABEL, min_size=1, max_size=5), st.booleans())
def test_the_ascii_fast_path_agrees_with_full_idna_processing(labels: list[str], upper: bool) -> None:
    from host_agent.dnsnames import normalise_dns_name
    from host_agent.gatekeeper.names import _normalised

    name = ".".join(labels)
    name = name.upper() if upper else name
    try:
        expected = normalise_dns_name(name)
    except (UnicodeError, ValueError):
        expected = ""
    assert _normalised(name) == expected
