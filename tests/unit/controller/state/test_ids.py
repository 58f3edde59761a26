"""Sandbox ids are `<prefix>-<8 lowercase hex>`, random, and refuse prefixes that would break the format."""

from __future__ import annotations

import re

import pytest

from controller.state import new_sandbox_id


@pytest.mark.parametrize("prefix", ["sb", "a", "goose", "abcdefghijkl", "k8s"])
def test_id_is_prefix_dash_eight_hex(prefix: str) -> None:
    sandbox_id = new_sandbox_id(prefix)
    assert re.fullmatch(rf"{prefix}-[a-f0-9]{{8}}", sandbox_id)


def test_ids_are_random() -> None:
    ids = {new_sandbox_id("sb") for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize("prefix", ["", "Sb", "1sb", "sb-x", "sb_x", "s b", "abcdefghijklm", "sb-", "é"])
def test_bad_prefix_is_refused_by_name(prefix: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(prefix))):
        new_sandbox_id(prefix)
