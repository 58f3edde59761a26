"""Profile inheritance: resolve `extends` names to files and fold the layers into one document.

Parents fold left to right, then the child: maps merge deeply, later scalars win, lists append with
duplicates removed (parent entries first). A list or map tagged `!replace` in a layer replaces what
that layer inherits, so an allowlist can shrink. `extends`, `metadata.name` and `metadata.abstract` are
never inherited: a profile names itself, and a fragment's abstractness stays with the fragment.

Every merged value remembers which file and line set it, so errors found after merging still point at
the line the operator has to change.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.profile.errors import FieldPath, Finding, Location, ProfileError
from controller.profile.source import SourceDocument, read_document

MAX_EXTENDS_DEPTH = 10
PROFILE_PATH_ENV = "KM_PROFILE_PATH"
BUILTIN_PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
_NOT_INHERITED: tuple[FieldPath, ...] = (("extends",), ("metadata", "name"), ("metadata", "abstract"))


@dataclass(frozen=True)
class MergedDocument:
    """A profile with every parent folded in, where each value came from, and the files it was built from."""

    file: Path
    data: dict[str, Any]
    locations: dict[FieldPath, Location]
    files: tuple[Path, ...]

    def location(self, path: FieldPath) -> Location:
        """Where `path` was set, or its nearest set ancestor when the field itself is absent."""
        for end in range(len(path), -1, -1):
            found = self.locations.get(path[:end])
            if found is not None:
                return found
        return Location(self.file, 1)

    @property
    def abstract(self) -> bool:
        metadata = self.data.get("metadata")
        return isinstance(metadata, dict) and metadata.get("abstract") is True


@dataclass
class ProfileResolver:
    """Finds profile files by name and merges them, caching each file so diamonds are resolved once."""

    builtin_dir: Path = BUILTIN_PROFILES_DIR
    extra_dirs: Sequence[Path] | None = None
    _merged: dict[Path, MergedDocument] = field(default_factory=dict, repr=False)

    def search_dirs(self, child_dir: Path | None = None) -> list[Path]:
        """The order names resolve in: built-ins, the child's own directory, then KM_PROFILE_PATH."""
        dirs = [self.builtin_dir]
        if child_dir is not None:
            dirs.append(child_dir)
        if self.extra_dirs is not None:
            dirs.extend(self.extra_dirs)
        else:
            dirs.extend(Path(part) for part in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if part)
        return dirs

    def find(self, reference: str, child_dir: Path | None = None) -> Path | None:
        """The file a name or a path refers to, or None when nothing matches."""
        as_path = Path(reference)
        if reference.endswith((".yaml", ".yml")) and _exists(as_path):
            return as_path.resolve()
        if as_path.is_absolute() or ".." in as_path.parts or not reference.strip():
            return None
        for directory in self.search_dirs(child_dir):
            for suffix in (".yaml", ".yml"):
                candidate = directory / f"{reference}{suffix}"
                if _exists(candidate):
                    return candidate.resolve()
        return None

    def load(self, reference: str) -> MergedDocument:
        """Resolve a name or path given by an operator and merge its ancestry."""
        file = self.find(reference)
        if file is None and reference.endswith((".yaml", ".yml")):
            raise ProfileError([Finding((), f"file not found: {reference}")])
        if file is None:
            searched = ", ".join(str(d) for d in self.search_dirs())
            raise ProfileError([Finding((), f"no profile named {reference!r} (a file path, or a name looked up in {searched})")])
        return self.merge_file(file)

    def merge_file(self, file: Path) -> MergedDocument:
        return self._merge(read_document(file), ())

    def merge_document(self, document: SourceDocument) -> MergedDocument:
        """Merge an already-parsed document (used for in-memory profiles and property tests)."""
        return self._merge(document, ())

    def _merge(self, document: SourceDocument, chain: tuple[Path, ...]) -> MergedDocument:
        chain = chain + (document.file,)
        parents = [self._resolve_parent(document, name, index, chain) for index, name in _extends_names(document)]
        merged_data: dict[str, Any] = {}
        locations: dict[FieldPath, Location] = {}
        files: list[Path] = []
        for parent in parents:
            parent_data, parent_locations = _strip_not_inherited(parent.data, parent.locations)
            merged_data = _merge_layer(merged_data, locations, parent_data, parent_locations, frozenset(), ())
            files.extend(f for f in parent.files if f not in files)
        own_locations = {path: Location(document.file, line) for path, line in document.lines.items()}
        own_data = {key: value for key, value in document.data.items() if key != "extends"}
        own_locations = {path: loc for path, loc in own_locations.items() if path[:1] != ("extends",)}
        merged_data = _merge_layer(merged_data, locations, own_data, own_locations, document.replace_paths, ())
        locations.setdefault((), Location(document.file, 1))
        files.insert(0, document.file)
        return MergedDocument(document.file, merged_data, locations, tuple(files))

    def _resolve_parent(self, document: SourceDocument, name: str, index: int | None, chain: tuple[Path, ...]) -> MergedDocument:
        path: FieldPath = ("extends",) if index is None else ("extends", index)
        where = document.location(path)
        parent_file = self.find(name, document.file.parent)
        if parent_file is None:
            searched = ", ".join(str(d) for d in self.search_dirs(document.file.parent))
            raise ProfileError(
                [Finding(path, f"parent profile {name!r} not found (looked for {name}.yaml in {searched})", where)]
            )
        if parent_file in chain:
            cycle = " → ".join(_profile_label(f) for f in chain[chain.index(parent_file) :] + (parent_file,))
            raise ProfileError([Finding(path, f"extends cycle: {cycle}; remove one of these extends", where)])
        if len(chain) >= MAX_EXTENDS_DEPTH:
            trail = " → ".join(_profile_label(f) for f in chain + (parent_file,))
            raise ProfileError([Finding(path, f"extends is nested deeper than {MAX_EXTENDS_DEPTH} levels: {trail}", where)])
        cached = self._merged.get(parent_file)
        if cached is None:
            cached = self._merged[parent_file] = self._merge(read_document(parent_file), chain)
        return cached


def _exists(path: Path) -> bool:
    """A file is there, or something is in the way of looking (reading it will then say what)."""
    try:
        return path.is_file()
    except PermissionError:
        return True


def _extends_names(document: SourceDocument) -> list[tuple[int | None, str]]:
    value = document.data.get("extends")
    if value is None:
        return []
    if isinstance(value, str):
        items: list[tuple[int | None, object]] = [(None, value)]
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        raise ProfileError(
            [Finding(("extends",), "extends takes a profile name or a list of names", document.location(("extends",)))]
        )
    names: list[tuple[int | None, str]] = []
    for index, name in items:
        path: FieldPath = ("extends",) if index is None else ("extends", index)
        if not isinstance(name, str) or not name.strip():
            raise ProfileError(
                [Finding(path, "a parent is named by a non-empty string, e.g. base/network/locked", document.location(path))]
            )
        names.append((index, name))
    return names


def _profile_label(file: Path) -> str:
    try:
        return str(file.relative_to(BUILTIN_PROFILES_DIR).with_suffix(""))
    except ValueError:
        return file.stem


def _strip_not_inherited(
    data: dict[str, Any], locations: dict[FieldPath, Location]
) -> tuple[dict[str, Any], dict[FieldPath, Location]]:
    stripped = copy.deepcopy(data)
    for path in _NOT_INHERITED:
        container: Any = stripped
        for key in path[:-1]:
            container = container.get(key) if isinstance(container, dict) else None
        if isinstance(container, dict):
            container.pop(path[-1], None)
    kept = {p: loc for p, loc in locations.items() if not any(p[: len(n)] == n for n in _NOT_INHERITED)}
    return stripped, kept


def _merge_layer(
    base: Any,
    locations: dict[FieldPath, Location],
    layer: Any,
    layer_locations: dict[FieldPath, Location],
    replace_paths: frozenset[FieldPath],
    path: FieldPath,
) -> Any:
    """Fold `layer` onto `base` at `path`, updating `locations` in place; returns the merged value."""
    if path not in replace_paths:
        if isinstance(base, dict) and isinstance(layer, dict):
            merged = dict(base)
            if path in layer_locations:
                locations.setdefault(path, layer_locations[path])
            for key, value in layer.items():
                child = path + (key,)
                if key in merged:
                    merged[key] = _merge_layer(merged[key], locations, value, layer_locations, replace_paths, child)
                else:
                    merged[key] = copy.deepcopy(value)
                    _copy_locations(layer_locations, child, child, locations)
            return merged
        if isinstance(base, list) and isinstance(layer, list):
            merged_list = list(base)
            for index, item in enumerate(layer):
                if item not in merged_list:
                    merged_list.append(copy.deepcopy(item))
                    _copy_locations(layer_locations, path + (index,), path + (len(merged_list) - 1,), locations)
            if path in layer_locations:
                locations[path] = layer_locations[path]
            return merged_list
    for stale in [p for p in locations if p[: len(path)] == path]:
        del locations[stale]
    _copy_locations(layer_locations, path, path, locations)
    return copy.deepcopy(layer)


def _copy_locations(
    source: dict[FieldPath, Location], source_root: FieldPath, target_root: FieldPath, target: dict[FieldPath, Location]
) -> None:
    depth = len(source_root)
    for path, where in source.items():
        if path[:depth] == source_root:
            target[target_root + path[depth:]] = where


def fold_layers(layers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge plain data layers with the same rules as files (no locations); for tests and tooling."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge_layer(merged, {}, layer, {}, frozenset(), ())
    return merged
