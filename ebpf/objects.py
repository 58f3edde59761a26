"""Compiled BPF objects: built once from `*.bpf.c` with clang, found again by the source's hash.

An object is named after a hash of its source and the compile command (`objects/gate-<hash>.bpf.o`), so
an edited source can never be served by a stale object. On a development host `compiled_object()`
compiles whatever is missing (clang and libbpf's headers, which scripts/setup.sh installs); images are
baked with their objects already inside the km wheel (`python -m ebpf.objects` before the wheel is
built), so sandboxes never need a compiler.

Run `python -m ebpf.objects` to build every object (what setup and bake do).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES_DIR = Path(__file__).resolve().parent
OBJECTS_DIR = SOURCES_DIR / "objects"
COMPILERS = ("clang-14", "clang-15", "clang-16", "clang")
_ARCHES = {"x86_64": "x86", "aarch64": "arm64"}


class ObjectError(Exception):
    """No object for the source and no way to build one; the message says what to install or run."""


def _compile_flags() -> list[str]:
    machine = platform.machine()
    multiarch = f"/usr/include/{machine}-linux-gnu"
    # -g emits the BTF that libbpf needs for the maps' definitions.
    return [
        "-O2",
        "-g",
        "-target",
        "bpf",
        f"-D__TARGET_ARCH_{_ARCHES.get(machine, machine)}",
        f"-I{multiarch}",
        "-Wall",
        "-Werror",
    ]


def object_path(source: Path, objects_dir: Path = OBJECTS_DIR) -> Path:
    """Where the object for this exact source text (and compile command) lives."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update("\0".join(_compile_flags()).encode())
    stem = source.name.removesuffix(".bpf.c")
    return objects_dir / f"{stem}-{digest.hexdigest()[:16]}.bpf.o"


def find_compiler() -> str | None:
    return next((found for name in COMPILERS if (found := shutil.which(name))), None)


def compiled_object(source: Path, objects_dir: Path = OBJECTS_DIR) -> Path:
    """The object for `source`, compiling it first when it is missing and a compiler is here."""
    target = object_path(source, objects_dir)
    if target.is_file():
        return target
    compiler = find_compiler()
    if compiler is None:
        raise ObjectError(
            f"no compiled BPF object for {source.name} ({target.name}) and no clang to build it: "
            "run `bash scripts/setup.sh` (installs clang-14 and libbpf-dev) or rebake the image"
        )
    return _compile(compiler, source, target)


def _compile(compiler: str, source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a concurrent compile or a crash never leaves half an object.
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    command = [compiler, *_compile_flags(), "-c", str(source), "-o", temporary]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        Path(temporary).unlink(missing_ok=True)
        raise ObjectError(f"compiling {source.name} failed:\n{result.stderr.strip()}")
    os.replace(temporary, target)
    os.chmod(target, 0o644)
    _remove_stale(source, keep=target)
    return target


def _remove_stale(source: Path, keep: Path) -> None:
    """Older objects of the same source: the wheel would otherwise carry every version ever built."""
    stem = source.name.removesuffix(".bpf.c")
    for old in keep.parent.glob(f"{stem}-*.bpf.o"):
        if old != keep:
            old.unlink(missing_ok=True)


def build_all() -> list[Path]:
    return [compiled_object(source) for source in sorted(SOURCES_DIR.glob("*.bpf.c"))]


if __name__ == "__main__":
    try:
        for built in build_all():
            print(built.relative_to(SOURCES_DIR.parent))
    except ObjectError as error:
        print(f"ebpf: {error}", file=sys.stderr)
        sys.exit(1)
