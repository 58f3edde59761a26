"""The teardown handler's Lambda code: km's own packages and their pure dependencies in one zip.

Built from what this interpreter has installed (the handler runs on the Lambda Python runtime of the
same version, which provides boto3). Every entry has a fixed timestamp and order, so the same code
always gives the same bytes and hash: `km init` compares that hash with the deployed function's and
uploads only when the code changed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

# Imported by the handler (directly or through controller.profile/compiler/state); boto3 is the runtime's.
PACKAGES = (
    "controller",
    "host_agent",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_extensions",
    "typing_inspection",
    "yaml",
)
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)
_SKIPPED_SUFFIXES = (".pyc",)
_SKIPPED_PARTS = ("__pycache__", "tests")


def _sources(name: str) -> list[tuple[str, Path]]:
    """(archive name, file) for one top-level module or package, as the interpreter would import it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name} is not installed; the teardown handler needs it (pip install km[aws])")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        root = origin.parent
        files = [
            path
            for path in sorted(root.rglob("*"))
            if path.is_file()
            and path.suffix not in _SKIPPED_SUFFIXES
            and not set(path.relative_to(root).parts) & set(_SKIPPED_PARTS)
        ]
        return [(f"{root.name}/{path.relative_to(root).as_posix()}", path) for path in files]
    return [(origin.name, origin)]


def build_zip(packages: tuple[str, ...] = PACKAGES) -> bytes:
    """The deployment zip; deterministic for the same installed code."""
    entries = sorted({archive: path for name in packages for archive, path in _sources(name)}.items())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for archive_name, path in entries:
            info = zipfile.ZipInfo(archive_name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def code_sha256(code: bytes) -> str:
    """Lambda's CodeSha256: the base64 of the zip's SHA-256."""
    return base64.b64encode(hashlib.sha256(code).digest()).decode()
