"""The package surface: one adapter per agent name, shared helpers, and a stdlib-only import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import host_agent.agents
from host_agent.agents import adapter_for
from host_agent.agents.base import bounded_text, exit_reason, int_or_none, one_line, token_usage
from tests.conftest import REPO_ROOT


def test_the_public_surface_is_short_and_sorted() -> None:
    assert host_agent.agents.__all__ == ["AGENT_NAMES", "AgentAdapter", "AgentInvocation", "AgentOutcome", "adapter_for"]
    assert host_agent.agents.AGENT_NAMES == ("claude", "codex", "goose", "custom")


@pytest.mark.parametrize("name", ["claude", "codex", "goose", "custom"])
def test_each_agent_name_has_an_adapter_of_that_name(name: str) -> None:
    assert adapter_for(name).name == name


def test_an_unknown_agent_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown agent 'aider': expected one of claude, codex, goose, custom"):
        adapter_for("aider")


def test_importing_the_adapters_loads_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import host_agent.agents; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) - {'host_agent'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "[]"


def test_usage_always_has_the_four_keys() -> None:
    assert token_usage(output_tokens=5) == {
        "input_tokens": None,
        "output_tokens": 5,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }


@pytest.mark.parametrize(
    ("exit_code", "stderr_tail", "expected"),
    [
        (1, "warming up\nError: invalid API key\n\n", "claude exited 1: Error: invalid API key"),
        (2, "", "claude exited 2 with nothing on stderr"),
        (-15, "", "claude was killed by signal 15 with nothing on stderr"),
    ],
)
def test_exit_reason_names_the_status_and_stderrs_last_line(exit_code: int, stderr_tail: str, expected: str) -> None:
    assert exit_reason("claude", exit_code, stderr_tail) == expected


def test_one_line_collapses_whitespace_and_caps_length() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * 1000)) == 300


def test_bounded_text_keeps_64_kib_and_survives_bad_bytes() -> None:
    assert len(bounded_text(b"a" * 100_000)) == 65536
    assert bounded_text(b"ok \xff") == "ok \ufffd"


@pytest.mark.parametrize(("value", "expected"), [(3, 3), (3.0, 3), (True, None), ("3", None), (None, None)])
def test_counts_from_json_are_numbers_only(value: object, expected: int | None) -> None:
    assert int_or_none(value) == expected
