"""The YAML layer: safe loading, line numbers, and refusing hostile or broken documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.profile import ProfileError
from controller.profile.source import MAX_DOCUMENT_BYTES, parse_document, read_document


def _error(text: str, tmp_path: Path) -> str:
    with pytest.raises(ProfileError) as caught:
        parse_document(text, tmp_path / "p.yaml")
    (finding,) = caught.value.findings
    return str(finding)


def test_records_the_line_of_every_field_and_list_item(tmp_path: Path) -> None:
    text = "a: 1\nb:\n  c: x\n  d:\n    - one\n    - two\n"
    document = parse_document(text, tmp_path / "p.yaml")
    assert document.data == {"a": 1, "b": {"c": "x", "d": ["one", "two"]}}
    assert document.lines[("a",)] == 1
    assert document.lines[("b", "c")] == 3
    assert document.lines[("b", "d", 1)] == 6
    assert document.location(("b", "missing", "deeper")).line == 2


def test_keys_stay_the_text_that_was_written(tmp_path: Path) -> None:
    # YAML 1.1 would turn these keys into booleans and numbers.
    document = parse_document("ON: 1\nno: 2\n123: 3\n", tmp_path / "p.yaml")
    assert list(document.data) == ["ON", "no", "123"]


def test_anchors_aliases_and_merge_keys_work(tmp_path: Path) -> None:
    text = "base: &b {x: 1, y: 2}\ncopy: *b\nmerged:\n  <<: *b\n  y: 3\n"
    document = parse_document(text, tmp_path / "p.yaml")
    assert document.data["copy"] == {"x": 1, "y": 2}
    assert document.data["merged"] == {"x": 1, "y": 3}


def test_replace_tag_is_recorded_on_lists_and_maps(tmp_path: Path) -> None:
    document = parse_document("a: !replace [x]\nb: !replace {c: 1}\n", tmp_path / "p.yaml")
    assert document.data == {"a": ["x"], "b": {"c": 1}}
    assert document.replace_paths == {("a",), ("b",)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\na: 2\n", "p.yaml:2: duplicate key 'a' (first written on line 1)"),
        ("a: [1, 2\n", "p.yaml:2: invalid YAML"),
        ("a: !replace x\n", "p.yaml:1: !replace applies to a list or a map"),
        ("a: !!python/object:os.system x\n", "p.yaml:1: cannot read value"),
        ("a: !custom [1]\n", "p.yaml:1: unsupported YAML tag !custom"),
        ("- a\n- b\n", "p.yaml:1: the document must be a mapping"),
        ("", "p.yaml:1: the file is empty"),
        ("a: 1\n---\nb: 2\n", "invalid YAML"),
        ("? [a, b]\n: 1\n", "a key must be a plain name"),
    ],
)
def test_broken_documents_are_reported_with_file_and_line(text: str, expected: str, tmp_path: Path) -> None:
    assert expected in _error(text, tmp_path)


def test_refuses_documents_over_one_mebibyte(tmp_path: Path) -> None:
    big = "a: '" + "x" * MAX_DOCUMENT_BYTES + "'\n"
    file = tmp_path / "big.yaml"
    file.write_text(big)
    with pytest.raises(ProfileError, match="larger than 1 MiB"):
        read_document(file)


def test_refuses_deep_nesting_before_recursion_fails(tmp_path: Path) -> None:
    assert "nested deeper than 64 levels" in _error("a: " + "[" * 5000 + "]" * 5000 + "\n", tmp_path)


def test_accepts_nesting_up_to_the_limit(tmp_path: Path) -> None:
    document = parse_document("a: " + "[" * 60 + "]" * 60 + "\n", tmp_path / "p.yaml")
    assert isinstance(document.data["a"], list)


def test_refuses_alias_bombs(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    assert "alias bomb" in _error("\n".join(lines) + "\n", tmp_path)


def test_refuses_recursive_aliases(tmp_path: Path) -> None:
    assert "nested deeper" in _error("a: &a [*a]\n", tmp_path)


def test_reports_missing_files_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file not found"):
        read_document(tmp_path / "absent.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"a: caf\xe9\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        read_document(latin)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: &a [*a]\n", "nested deeper"),
    ],
)
def test_the_pure_python_loader_refuses_the_same_documents(
    text: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without libyaml, PyYAML's own parser is used and km limits nesting while composing.
    monkeypatch.setattr("yaml.__with_libyaml__", False)
    assert expected in _error(text, tmp_path)
    document = parse_document("a: [1, {b: 2}]\n", tmp_path / "p.yaml")
    assert document.data == {"a": [1, {"b": 2}]} and document.lines[("a", 1, "b")] == 1
