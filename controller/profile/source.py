"""Read one profile file into plain data, remembering the line of every field.

PyYAML's constructors throw line numbers away, so this module walks the composed node tree itself:
that keeps a line for every field path (errors must name the line), keeps keys as the literal text the
operator wrote (YAML 1.1 would turn an `env` key `ON` into `True`), reports duplicate keys instead of
silently keeping the last, and records which lists or maps carry the `!replace` tag.

Only the safe loader is used. Documents over 1 MiB, nested deeper than 64 levels, or whose aliases
expand past a node budget are refused with a message, never a traceback or a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from controller.profile.errors import FieldPath, Finding, Location, ProfileError

MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_NESTING_DEPTH = 64
MAX_EXPANDED_NODES = 100_000
REPLACE_TAG = "!replace"

_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", REPLACE_TAG}


@dataclass(frozen=True)
class SourceDocument:
    """One YAML file as data, with the line of each field path and the paths tagged `!replace`."""

    file: Path
    data: dict[str, Any]
    lines: dict[FieldPath, int]
    replace_paths: frozenset[FieldPath]

    def location(self, path: FieldPath) -> Location:
        """The line of `path`, or of its nearest written ancestor when the field itself is absent."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return Location(self.file, line)
        return Location(self.file, 1)


def read_document(file: Path) -> SourceDocument:
    """Read and parse `file`; every failure is a `ProfileError` naming the file."""
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise _error(file, None, f"file not found: {file}") from None
    except IsADirectoryError:
        raise _error(file, None, f"{file} is a directory, not a profile file") from None
    except OSError as exc:
        raise _error(file, None, f"cannot read {file}: {exc.strerror}") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _error(file, None, "document is larger than 1 MiB; profiles are small, split it with `extends`")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(file, None, f"not UTF-8 text (byte {exc.start}); save the profile as UTF-8") from None
    return parse_document(text, file)


def parse_document(text: str, file: Path) -> SourceDocument:
    """Parse YAML text; the root must be a mapping."""
    if len(text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
        raise _error(file, None, "document is larger than 1 MiB; profiles are small, split it with `extends`")
    loader = _loader(text, file)
    try:
        root = loader.get_single_node()
        if root is None:
            raise _error(file, 1, "the file is empty; a profile starts with `apiVersion: klankermaker.ai/v1alpha1`")
        if not isinstance(root, MappingNode):
            raise _error(file, _line(root), "the document must be a mapping of fields (apiVersion, kind, metadata, spec)")
        builder = _DataBuilder(loader, file)
        data = builder.build(root, ())
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(file, exc) from None
    except yaml.YAMLError as exc:
        raise _error(file, None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _error(file, None, f"nested deeper than {MAX_NESTING_DEPTH} levels") from None
    finally:
        loader.dispose()
    return SourceDocument(file, data, builder.lines, frozenset(builder.replace_paths))


def _loader(text: str, file: Path) -> yaml.SafeLoader:
    """libyaml's safe loader when PyYAML has it (five times faster; it limits nesting itself), else ours."""
    if getattr(yaml, "__with_libyaml__", False):
        return yaml.CSafeLoader(text)  # type: ignore[return-value]
    return _DepthLimitedLoader(text, file)


class _DepthLimitedLoader(yaml.SafeLoader):
    """The safe loader, refusing deep nesting while composing (before Python's recursion limit bites)."""

    def __init__(self, text: str, file: Path) -> None:
        super().__init__(text)
        self._file = file
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _error(self._file, mark.line + 1, f"nested deeper than {MAX_NESTING_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _DataBuilder:
    """Turns composed nodes into dicts, lists and scalars while recording lines and `!replace` tags."""

    def __init__(self, loader: yaml.SafeLoader, file: Path) -> None:
        self._loader = loader
        self._file = file
        self._visited = 0
        self.lines: dict[FieldPath, int] = {}
        self.replace_paths: set[FieldPath] = set()

    def build(self, node: Node, path: FieldPath) -> Any:
        self._visited += 1
        if self._visited > MAX_EXPANDED_NODES:
            raise _error(self._file, _line(node), "aliases expand to too many values; is this an alias bomb?")
        if len(path) > MAX_NESTING_DEPTH:
            raise _error(self._file, _line(node), f"nested deeper than {MAX_NESTING_DEPTH} levels (recursive alias?)")
        self.lines.setdefault(path, _line(node))
        if node.tag == REPLACE_TAG:
            if isinstance(node, ScalarNode):
                raise _error(self._file, _line(node), f"{REPLACE_TAG} applies to a list or a map, not to a single value")
            self.replace_paths.add(path)
        elif not isinstance(node, ScalarNode) and node.tag not in _COLLECTION_TAGS:
            raise _error(self._file, _line(node), f"unsupported YAML tag {node.tag}; only {REPLACE_TAG} is understood")
        if isinstance(node, MappingNode):
            return self._build_mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.build(item, path + (index,)) for index, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self._build_scalar(node)

    def _build_mapping(self, node: MappingNode, path: FieldPath) -> dict[str, Any]:
        written: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _error(self._file, _line(key_node), "a key must be a plain name, not a list or a map")
            if key_node.tag == _MERGE_TAG:
                continue
            if key_node.value in written:
                first = written[key_node.value]
                raise _error(self._file, _line(key_node), f"duplicate key {key_node.value!r} (first written on line {first})")
            written[key_node.value] = _line(key_node)
        self._loader.flatten_mapping(node)  # resolves `<<` merge keys: merged entries first, own keys after
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            self.lines[path + (key,)] = _line(key_node)
            mapping[key] = self.build(value_node, path + (key,))
        return mapping

    def _build_scalar(self, node: ScalarNode) -> Any:
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise _error(self._file, _line(node), f"cannot read value: {exc.problem}") from None


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _error(file: Path, line: int | None, message: str) -> ProfileError:
    return ProfileError([Finding((), message, Location(file, line))])


def _yaml_error(file: Path, exc: yaml.MarkedYAMLError) -> ProfileError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    parts = [part for part in (exc.context, exc.problem) if part]
    if any("maximum nesting depth" in part for part in parts):
        return _error(file, line, f"nested deeper than {MAX_NESTING_DEPTH} levels")
    detail = "; ".join(parts) if parts else "unreadable"
    return _error(file, line, f"invalid YAML: {detail}")
