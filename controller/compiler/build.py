"""Compile a profile reference into its build directory: the one entry point `km compile` and doit share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from controller.compiler.plan import compile_profile, write_plan
from controller.profile import ProfileResolver, load_profile

BUILD_DIR = Path("build")


@dataclass(frozen=True)
class CompileResult:
    name: str
    directory: Path
    hash: str
    changed: list[Path]


def compile_reference(
    reference: str,
    out_dir: Path | None = None,
    ami_block_device_names: Iterable[str] = (),
    resolver: ProfileResolver | None = None,
) -> CompileResult:
    """Load, validate and compile `reference`, writing `build/<name>/` (or `out_dir`)."""
    profile, _ = load_profile(reference, resolver)
    compiled = compile_profile(profile, ami_block_device_names)
    directory = out_dir or BUILD_DIR / compiled.name
    changed = write_plan(compiled, directory)
    return CompileResult(compiled.name, directory, compiled.hash, changed)
