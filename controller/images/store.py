"""The local image store: one directory per baked image, complete only when its metadata exists.

`<store>/<recipe>-<hash12>/rootfs/` is the image and `image.json` beside it says what it is. A bake
works in a hidden `.partial-…` directory and renames it into place as its very last step, so an
interrupted bake never leaves something that looks like an image.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

IMAGE_DIR_ENV = "KM_IMAGE_DIR"
DEFAULT_IMAGE_DIR = Path("/var/lib/km/images")
METADATA_FILE = "image.json"


@dataclass(frozen=True)
class Image:
    """A complete baked image."""

    directory: Path
    metadata: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def recipe(self) -> str:
        return str(self.metadata["recipe"])

    @property
    def hash(self) -> str:
        return str(self.metadata["hash"])


def image_store_dir() -> Path:
    return Path(os.environ.get(IMAGE_DIR_ENV) or DEFAULT_IMAGE_DIR)


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or image_store_dir()

    def find(self, image_name: str) -> Image | None:
        directory = self.root / image_name
        metadata_file = directory / METADATA_FILE
        if not metadata_file.is_file():
            return None
        return Image(directory, json.loads(metadata_file.read_text(encoding="utf-8")))

    def images(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        found = (self.find(path.name) for path in sorted(self.root.iterdir()) if not path.name.startswith("."))
        return [image for image in found if image is not None]

    def latest(self, recipe: str) -> Image | None:
        """The newest complete image of a recipe (any hash): what a sandbox uses when its recipe moved on."""
        candidates = [image for image in self.images() if image.recipe == recipe]
        return max(candidates, key=lambda image: str(image.metadata["created_at"]), default=None)

    def partial_dir(self, image_name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        return self.root / f".partial-{image_name}-{os.getpid()}"

    def commit(self, partial: Path, image_name: str, metadata: dict[str, Any]) -> Image:
        """Write the metadata and move the finished partial directory into place, atomically."""
        metadata = {**metadata, "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")}
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        target = self.root / image_name
        try:
            os.rename(partial, target)
        except OSError:
            existing = self.find(image_name)
            if existing is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another bake of the same hash finished first
            return existing
        return Image(target, metadata)

    def remove_stale_partials(self) -> list[Path]:
        """Partial directories whose baking process is gone."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in self.root.glob(".partial-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
