"""Inheritance: name resolution, the fold, !replace, cycles, depth, and where merged values came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controller.profile import ProfileError, ProfileResolver, load_profile, validate
from controller.profile.extends import fold_layers

FRAGMENT = "apiVersion: klankermaker.ai/v1alpha1\nkind: SandboxProfile\nmetadata: {{name: {name}, abstract: true}}\n"


def write(directory: Path, name: str, text: str) -> Path:
    file = directory / f"{name}.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return file


@pytest.fixture
def builtin(tmp_path: Path) -> Path:
    directory = tmp_path / "builtin"
    directory.mkdir()
    return directory


@pytest.fixture
def resolver(builtin: Path) -> ProfileResolver:
    return ProfileResolver(builtin_dir=builtin, extra_dirs=[])


def goose_child(extends: str, extra: str = "") -> str:
    return f"extends: {extends}\nmetadata: {{name: child}}\n{extra}"


def test_maps_merge_scalars_later_wins_lists_append_without_duplicates() -> None:
    merged = fold_layers(
        [
            {"a": {"x": 1, "y": [1, 2]}, "s": "parent"},
            {"a": {"z": 3, "y": [2, 3]}, "s": "child"},
        ]
    )
    assert merged == {"a": {"x": 1, "z": 3, "y": [1, 2, 3]}, "s": "child"}


def test_parents_fold_left_to_right_then_child(builtin: Path, resolver: ProfileResolver) -> None:
    write(
        builtin,
        "one",
        FRAGMENT.format(name="one") + "spec:\n  network:\n    egress:\n      allowedHosts: [a.example]\n  cli: {agent: codex}\n",
    )
    write(
        builtin,
        "two",
        FRAGMENT.format(name="two")
        + "spec:\n  network:\n    egress:\n      allowedHosts: [b.example, a.example]\n  cli: {agent: goose}\n",
    )
    child = write(
        builtin.parent,
        "child",
        "extends: [one, two]\nmetadata: {name: child}\nspec:\n  network:\n    egress:\n      allowedHosts: [c.example]\n",
    )
    merged = resolver.merge_file(child)
    assert merged.data["spec"]["network"]["egress"]["allowedHosts"] == ["a.example", "b.example", "c.example"]
    assert merged.data["spec"]["cli"]["agent"] == "goose"
    assert [f.name for f in merged.files] == ["child.yaml", "one.yaml", "two.yaml"]


def test_replace_tag_lets_an_allowlist_shrink(builtin: Path, resolver: ProfileResolver) -> None:
    write(
        builtin,
        "wide",
        FRAGMENT.format(name="wide") + "spec:\n  network:\n    egress:\n      allowedDNSSuffixes: [.a.com, .b.com]\n",
    )
    child = write(
        builtin.parent,
        "narrow",
        "extends: wide\nmetadata: {name: narrow}\nspec:\n  network:\n    egress:\n      allowedDNSSuffixes: !replace [.b.com]\n",
    )
    assert resolver.merge_file(child).data["spec"]["network"]["egress"]["allowedDNSSuffixes"] == [".b.com"]


def test_replace_on_a_map_drops_inherited_keys(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "p", FRAGMENT.format(name="p") + "spec:\n  execution:\n    env: {A: '1', B: '2'}\n")
    child = write(builtin.parent, "c", "extends: p\nmetadata: {name: c}\nspec:\n  execution:\n    env: !replace {C: '3'}\n")
    assert resolver.merge_file(child).data["spec"]["execution"]["env"] == {"C": "3"}


def test_name_and_abstract_are_not_inherited(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "frag", FRAGMENT.format(name="frag"))
    child = write(builtin.parent, "c", "extends: frag\nmetadata: {prefix: cc}\n")
    merged = resolver.merge_file(child)
    assert merged.data["metadata"] == {"prefix": "cc"}
    assert not merged.abstract
    assert "extends" not in merged.data


def test_names_with_slashes_resolve_in_order_builtin_child_dir_then_profile_path(tmp_path: Path, builtin: Path) -> None:
    own, extra = tmp_path / "own", tmp_path / "extra"
    write(builtin, "base/net", FRAGMENT.format(name="builtin-net"))
    write(own, "base/net", FRAGMENT.format(name="own-net"))
    write(own, "only-own", FRAGMENT.format(name="own-only"))
    write(extra, "only-own", FRAGMENT.format(name="extra-only"))
    write(extra, "only-extra", FRAGMENT.format(name="extra-extra"))
    child = write(own, "child", "extends: [base/net, only-own, only-extra]\nmetadata: {name: child}\n")
    merged = ProfileResolver(builtin_dir=builtin, extra_dirs=[extra]).merge_file(child)
    assert [f"{f.parent.name}/{f.name}" for f in merged.files] == [
        "own/child.yaml",
        "base/net.yaml",
        "own/only-own.yaml",
        "extra/only-extra.yaml",
    ]
    assert merged.files[1].parent.parent == builtin


def test_km_profile_path_is_read_from_the_environment(tmp_path: Path, builtin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write(second, "team/base", FRAGMENT.format(name="team"))
    monkeypatch.setenv("KM_PROFILE_PATH", f"{first}:{second}")
    resolver = ProfileResolver(builtin_dir=builtin)
    assert resolver.find("team/base") == (second / "team/base.yaml").resolve()
    assert resolver.find("../escape") is None


def test_missing_parent_names_the_line_and_where_it_looked(builtin: Path, resolver: ProfileResolver) -> None:
    child = write(builtin.parent, "c", "metadata: {name: c}\nextends:\n  - nope/missing\n")
    with pytest.raises(ProfileError) as caught:
        resolver.merge_file(child)
    (finding,) = caught.value.findings
    assert finding.location.line == 3
    assert finding.dotted_path == "extends[0]"
    assert "parent profile 'nope/missing' not found" in finding.message
    assert str(builtin) in finding.message


def test_cycle_is_an_error_that_prints_the_chain(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "a", "extends: b\nmetadata: {name: a}\n")
    write(builtin, "b", "extends: c\nmetadata: {name: b}\n")
    write(builtin, "c", "extends: a\nmetadata: {name: c}\n")
    with pytest.raises(ProfileError) as caught:
        resolver.load("a")
    (finding,) = caught.value.findings
    assert "extends cycle: a → b → c → a" in finding.message
    assert finding.location.file is not None and finding.location.file.name == "c.yaml"


def test_self_extension_is_a_cycle(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "me", "extends: me\nmetadata: {name: me}\n")
    with pytest.raises(ProfileError, match="extends cycle: me → me"):
        resolver.load("me")


def test_diamonds_are_fine_and_shared_bases_count_once(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "root", FRAGMENT.format(name="root") + "spec:\n  execution:\n    initCommands: [root]\n")
    write(builtin, "left", "extends: root\n" + FRAGMENT.format(name="left") + "spec:\n  execution:\n    initCommands: [left]\n")
    write(
        builtin, "right", "extends: root\n" + FRAGMENT.format(name="right") + "spec:\n  execution:\n    initCommands: [right]\n"
    )
    child = write(builtin.parent, "d", "extends: [left, right]\nmetadata: {name: d}\n")
    merged = resolver.merge_file(child)
    assert merged.data["spec"]["execution"]["initCommands"] == ["root", "left", "right"]
    assert sorted(f.name for f in merged.files) == ["d.yaml", "left.yaml", "right.yaml", "root.yaml"]


@pytest.mark.parametrize(("depth", "ok"), [(10, True), (11, False)])
def test_depth_limit_is_ten(builtin: Path, resolver: ProfileResolver, depth: int, ok: bool) -> None:
    for level in range(depth - 1):
        write(builtin, f"l{level}", f"extends: l{level + 1}\n" + FRAGMENT.format(name=f"l{level}"))
    write(builtin, f"l{depth - 1}", FRAGMENT.format(name="leaf"))
    if ok:
        assert len(resolver.load("l0").files) == depth
    else:
        with pytest.raises(ProfileError, match="nested deeper than 10 levels: l0 → l1"):
            resolver.load("l0")


@pytest.mark.parametrize("value", ["[1]", "{a: b}", "['']", "''"])
def test_extends_must_name_profiles(builtin: Path, resolver: ProfileResolver, value: str) -> None:
    child = write(builtin.parent, "c", f"extends: {value}\nmetadata: {{name: c}}\n")
    with pytest.raises(ProfileError) as caught:
        resolver.merge_file(child)
    assert caught.value.findings[0].dotted_path.startswith("extends")


def test_errors_after_merging_point_into_the_file_that_set_the_value(builtin: Path) -> None:
    write(builtin, "base/runtime", FRAGMENT.format(name="rt") + "spec:\n  runtime:\n    substrate: ec2\n    spot: true\n")
    goose = (Path(__file__).resolve().parents[4] / "profiles" / "goose.yaml").read_text()
    child_text = (
        goose.replace("    spot: false\n", "")
        .replace("teardownPolicy: stop", "teardownPolicy: destroy")
        .replace("kind: SandboxProfile\n", "kind: SandboxProfile\nextends: base/runtime\n")
    )
    child = write(builtin.parent, "child", child_text)
    report = validate(child, ProfileResolver(builtin_dir=builtin, extra_dirs=[]))
    (finding,) = report.errors
    assert finding.dotted_path == "spec.runtime.spot"
    assert finding.location.file == (builtin / "base/runtime.yaml").resolve()
    assert finding.location.line == 7


def test_a_fragment_cannot_be_created_but_validates_structurally(builtin: Path, resolver: ProfileResolver) -> None:
    write(builtin, "frag", FRAGMENT.format(name="frag") + "spec:\n  runtime: {spot: true}\n")
    report = validate("frag", resolver)
    assert report.valid and report.abstract
    with pytest.raises(ProfileError, match="abstract fragment"):
        load_profile("frag", resolver)
    write(builtin, "badfrag", FRAGMENT.format(name="badfrag") + "spec:\n  runtime: {spot: maybe, spto: true}\n")
    assert {f.dotted_path for f in validate("badfrag", resolver).errors} == {"spec.runtime.spot", "spec.runtime.spto"}


_scalars = st.one_of(st.integers(), st.text(max_size=3), st.booleans())
_lists = st.lists(_scalars, max_size=4)
_layers = st.dictionaries(
    st.sampled_from("abc"), st.one_of(_scalars, _lists, st.dictionaries(st.sampled_from("xy"), _lists, max_size=2)), max_size=3
)


@given(st.lists(_layers, min_size=1, max_size=4))
def test_fold_is_idempotent_and_keeps_every_list_item(layers: list[dict[str, Any]]) -> None:
    merged = fold_layers(layers)
    assert fold_layers([merged, merged]) == merged
    assert set(merged) == {key for layer in layers for key in layer}
    last = layers[-1]
    for key, value in last.items():
        if not isinstance(value, (list, dict)):
            assert merged[key] == value
    yaml.safe_dump(merged)
