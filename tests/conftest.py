"""Shared test helpers: profiles built from the goose reference profile, and the root-only marker."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings

from controller.profile import BUILTIN_PROFILES_DIR, ProfileResolver, ValidationReport, validate_document
from controller.profile.source import parse_document

REPO_ROOT = Path(__file__).resolve().parents[1]

# Machines here are shared and noisy: judge properties by their examples, not by wall-clock time.
settings.register_profile("km", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("km")
GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, nspawn, network namespaces): run as root, as CI does")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def goose_data() -> dict[str, Any]:
    """The goose profile as plain data, a fresh copy for each test to mutate."""
    return copy.deepcopy(yaml.safe_load(GOOSE_FILE.read_text()))


ValidateText = Callable[..., ValidationReport]


@pytest.fixture
def validate_text(tmp_path: Path) -> ValidateText:
    """Validate YAML text (or data) as if it were the file `tmp_path/<name>`."""

    def run(
        content: str | dict[str, Any], name: str = "profile.yaml", resolver: ProfileResolver | None = None
    ) -> ValidationReport:
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        file = tmp_path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        return validate_document(parse_document(text, file), resolver or ProfileResolver(extra_dirs=[]))

    return run
