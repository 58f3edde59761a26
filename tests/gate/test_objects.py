"""Compiled BPF objects: named by their source's hash, built with the real clang, loaded with the real libbpf."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ebpf import libbpf
from ebpf.objects import ObjectError, compiled_object, find_compiler, object_path

needs_clang = pytest.mark.skipif(find_compiler() is None, reason="needs clang (scripts/setup.sh installs clang-14)")

ACCEPTING = textwrap.dedent("""\
    #include <linux/bpf.h>
    #include <bpf/bpf_helpers.h>
    SEC("cgroup/connect4")
    int allow_all(struct bpf_sock_addr *ctx) { return 1; }
    char LICENSE[] SEC("license") = "GPL";
    """)


def write_source(directory: Path, text: str, name: str = "probe.bpf.c") -> Path:
    source = directory / name
    source.write_text(text)
    return source


def test_the_object_name_follows_the_source_text(tmp_path: Path) -> None:
    source = write_source(tmp_path, ACCEPTING)
    first = object_path(source, tmp_path / "objects")

    assert first == object_path(source, tmp_path / "objects")
    assert first.name.startswith("probe-") and first.name.endswith(".bpf.o")
    source.write_text(ACCEPTING + "\n/* edited */\n")
    assert object_path(source, tmp_path / "objects") != first


@needs_clang
def test_a_missing_object_is_compiled_once_and_an_edit_replaces_it(tmp_path: Path) -> None:
    source = write_source(tmp_path, ACCEPTING)
    objects = tmp_path / "objects"

    built = compiled_object(source, objects)
    assert built.read_bytes()[:4] == b"\x7fELF"
    stamp = built.stat().st_mtime_ns
    assert compiled_object(source, objects) == built and built.stat().st_mtime_ns == stamp  # not rebuilt

    source.write_text(ACCEPTING.replace("return 1", "return ctx->user_port != 0"))
    rebuilt = compiled_object(source, objects)
    assert rebuilt != built and not built.exists()  # the stale object is gone
    assert sorted(p.name for p in objects.iterdir()) == [rebuilt.name]


@needs_clang
def test_a_compile_error_names_the_source_and_shows_clang(tmp_path: Path) -> None:
    source = write_source(tmp_path, ACCEPTING.replace("return 1;", "return undefined_thing;"))

    with pytest.raises(ObjectError, match=r"compiling probe\.bpf\.c failed:\n.*undefined_thing"):
        compiled_object(source, tmp_path / "objects")
    assert not any((tmp_path / "objects").iterdir())  # no half-written object left


def test_without_a_compiler_the_error_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    source = write_source(tmp_path, ACCEPTING)

    with pytest.raises(ObjectError, match="no clang to build it: run `bash scripts/setup.sh`"):
        compiled_object(source, tmp_path / "objects")


@pytest.mark.root
@needs_clang
def test_a_program_the_verifier_rejects_fails_with_the_verifiers_words(tmp_path: Path) -> None:
    # Reading far past the context: compiles, never verifies.
    rejected = ACCEPTING.replace("return 1;", "return *(int *)((char *)ctx + 4096);")
    built = compiled_object(write_source(tmp_path, rejected), tmp_path / "objects")

    with pytest.raises(libbpf.LibbpfError) as failure:
        libbpf.BpfObject(built)

    assert "loading BPF object" in str(failure.value)
    assert "invalid bpf_context access" in str(failure.value)
