"""The profiles km ships: every YAML file under `profiles/`, named by its path without `.yaml`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.profile.errors import ProfileError
from controller.profile.extends import BUILTIN_PROFILES_DIR
from controller.profile.source import read_document


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: Path
    abstract: bool


def builtin_profiles(directory: Path = BUILTIN_PROFILES_DIR) -> list[CatalogEntry]:
    """Built-in profiles and fragments, sorted by name; a fragment is one marked `metadata.abstract`."""
    entries = []
    for file in sorted(directory.rglob("*.yaml")):
        try:
            metadata = read_document(file).data.get("metadata")
        except ProfileError:
            metadata = None  # still listed: validating it reports the problem
        abstract = isinstance(metadata, dict) and metadata.get("abstract") is True
        entries.append(CatalogEntry(file.relative_to(directory).with_suffix("").as_posix(), file, abstract))
    return entries
