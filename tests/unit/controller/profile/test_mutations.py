"""Property: any mutation of a valid profile validates or fails with located field-path errors, never an exception."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.profile import BUILTIN_PROFILES_DIR, ProfileResolver, validate_document
from controller.profile.source import parse_document

GOOSE = yaml.safe_load((BUILTIN_PROFILES_DIR / "goose.yaml").read_text())
VIRTUAL_FILE = Path("/nonexistent/mutant.yaml")

_leaf_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["0", "4h", "7d", "-1h", "us-east-1", "/data", "/", "*", ".github.com", "ec2", "local", "both", "ami-0123456789abcdef0"]
    ),
)
_values = st.recursive(
    _leaf_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, prefix + (index,))
    return found


def _mutate(data: dict[str, Any], path: tuple[Any, ...], action: str, value: Any, key: str) -> None:
    if not path:
        data[key] = value
        return
    *parents, last = path
    container: Any = data
    for part in parents:
        container = container[part]
    if action == "delete":
        del container[last]
    elif action == "replace":
        container[last] = value
    elif action == "unknown-key" and isinstance(container[last], dict):
        container[last][key] = value
    elif action == "rename" and isinstance(container, dict):
        container[str(last).swapcase() or key] = container.pop(last)


@st.composite
def mutants(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(GOOSE)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["delete", "replace", "unknown-key", "rename"]))
        _mutate(data, path, action, draw(_values), draw(st.text(min_size=1, max_size=8)))
    return data


def _check(report: Any) -> None:
    assert report.valid or report.errors
    for finding in report.findings:
        assert finding.location.file == VIRTUAL_FILE
        assert finding.location.line is not None and finding.location.line >= 1
        assert str(finding)
    if report.valid:
        assert report.profile is not None
    else:
        assert all(finding.path for finding in report.errors), [str(f) for f in report.errors]


@settings(max_examples=300)
@given(mutants())
def test_mutated_profiles_validate_or_fail_with_field_paths(data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    report = validate_document(parse_document(text, VIRTUAL_FILE), ProfileResolver(extra_dirs=[]))
    _check(report)


@given(st.data())
def test_mangled_yaml_text_never_raises(data: st.DataObject) -> None:
    text = (BUILTIN_PROFILES_DIR / "goose.yaml").read_text()
    position = data.draw(st.integers(min_value=0, max_value=len(text)))
    length = data.draw(st.integers(min_value=0, max_value=20))
    insert = data.draw(st.text(alphabet=":-[]{}&*!|>'\"#%@` \n\tabc01", max_size=10))
    mangled = text[:position] + insert + text[position + length :]
    resolver = ProfileResolver(extra_dirs=[])
    try:
        document = parse_document(mangled, VIRTUAL_FILE)
    except Exception as error:  # only ProfileError may escape the parser, and it must be located
        from controller.profile import ProfileError

        assert isinstance(error, ProfileError), repr(error)
        assert all(f.location.file == VIRTUAL_FILE for f in error.findings)
        return
    report = validate_document(document, resolver)
    for finding in report.findings:
        assert finding.location.file is not None
