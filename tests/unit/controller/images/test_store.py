"""The local image store: an image exists only once its metadata does, and abandoned bakes are swept.

Everything runs in tmp_path; the store never needs root for these operations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.images.store import DEFAULT_IMAGE_DIR, IMAGE_DIR_ENV, METADATA_FILE, Image, ImageStore, image_store_dir


def put_image(root: Path, name: str, **metadata: Any) -> Path:
    """A complete image directory as a finished bake leaves it."""
    directory = root / name
    (directory / "rootfs").mkdir(parents=True)
    (directory / METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    return directory


def dead_pid() -> int:
    """The pid of a child this test started and reaped: no process has it (until the kernel reuses it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- where the store is ------------------------------------------------------------------------


def test_the_store_root_comes_from_km_image_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(IMAGE_DIR_ENV, str(tmp_path / "images"))
    assert image_store_dir() == tmp_path / "images"
    assert ImageStore().root == tmp_path / "images"
    assert ImageStore(tmp_path / "other").root == tmp_path / "other"


@pytest.mark.parametrize("value", [None, ""])
def test_without_km_image_dir_the_store_is_in_var_lib(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(IMAGE_DIR_ENV, raising=False)
    else:
        monkeypatch.setenv(IMAGE_DIR_ENV, value)
    assert image_store_dir() == DEFAULT_IMAGE_DIR == Path("/var/lib/km/images")


# ---- find and images ---------------------------------------------------------------------------


def test_find_sees_a_complete_image(tmp_path: Path) -> None:
    directory = put_image(tmp_path, "debian-12-0123456789ab", recipe="debian-12", hash="0123456789ab" + "0" * 52)
    image = ImageStore(tmp_path).find("debian-12-0123456789ab")
    assert image == Image(directory, {"recipe": "debian-12", "hash": "0123456789ab" + "0" * 52})
    assert image.name == "debian-12-0123456789ab"
    assert image.rootfs == directory / "rootfs"
    assert image.recipe == "debian-12"
    assert image.hash.startswith("0123456789ab")


def test_find_ignores_a_directory_without_metadata(tmp_path: Path) -> None:
    (tmp_path / "debian-12-0123456789ab" / "rootfs").mkdir(parents=True)
    assert ImageStore(tmp_path).find("debian-12-0123456789ab") is None


def test_find_ignores_metadata_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "debian-12-0123456789ab" / METADATA_FILE).mkdir(parents=True)
    assert ImageStore(tmp_path).find("debian-12-0123456789ab") is None


def test_find_in_a_store_that_does_not_exist_yet(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "missing")
    assert store.find("debian-12-0123456789ab") is None
    assert store.images() == []
    assert store.latest("debian-12") is None
    assert store.remove_stale_partials() == []
    assert not store.root.exists()


def test_images_lists_complete_images_in_name_order_and_ignores_hidden_ones(tmp_path: Path) -> None:
    put_image(tmp_path, "debian-12-bbbbbbbbbbbb", recipe="debian-12", hash="b")
    put_image(tmp_path, "amazon-linux-2023-aaaaaaaaaaaa", recipe="amazon-linux-2023", hash="a")
    put_image(tmp_path, ".partial-debian-12-cccccccccccc-1", recipe="debian-12", hash="c")  # being committed
    put_image(tmp_path, ".hidden", recipe="debian-12", hash="d")
    (tmp_path / "debian-12-dddddddddddd" / "rootfs").mkdir(parents=True)  # no metadata: incomplete
    (tmp_path / ".failed-debian-12-eeeeeeeeeeee.log").write_text("bake log\n")
    (tmp_path / "stray-file").write_text("not an image\n")
    names = [image.name for image in ImageStore(tmp_path).images()]
    assert names == ["amazon-linux-2023-aaaaaaaaaaaa", "debian-12-bbbbbbbbbbbb"]


# ---- commit ------------------------------------------------------------------------------------


def test_partial_dir_is_hidden_and_names_this_process(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    partial = store.partial_dir("debian-12-0123456789ab")
    assert partial == tmp_path / "images" / f".partial-debian-12-0123456789ab-{os.getpid()}"
    assert store.root.is_dir() and (store.root.stat().st_mode & 0o777) == 0o755
    assert not partial.exists()  # the baker makes it


def test_commit_renames_the_partial_into_place_with_its_metadata(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    partial = store.partial_dir("debian-12-0123456789ab")
    (partial / "rootfs" / "etc").mkdir(parents=True)
    (partial / "rootfs" / "etc" / "hostname").write_text("sandbox\n")
    assert store.find("debian-12-0123456789ab") is None
    before = datetime.now(UTC).replace(microsecond=0)

    image = store.commit(partial, "debian-12-0123456789ab", {"recipe": "debian-12", "hash": "0123456789ab"})

    after = datetime.now(UTC)
    assert not partial.exists()
    assert image.directory == store.root / "debian-12-0123456789ab"
    assert (image.rootfs / "etc" / "hostname").read_text() == "sandbox\n"
    on_disk = json.loads((image.directory / METADATA_FILE).read_text(encoding="utf-8"))
    assert on_disk == image.metadata
    assert set(on_disk) == {"recipe", "hash", "created_at"}
    assert on_disk["recipe"] == "debian-12" and on_disk["hash"] == "0123456789ab"
    created_at = on_disk["created_at"]
    assert created_at.endswith("Z") and len(created_at) == len("2025-05-01T12:00:00Z")
    assert before <= datetime.fromisoformat(created_at) <= after
    assert store.find("debian-12-0123456789ab") == image
    assert [found.name for found in store.images()] == ["debian-12-0123456789ab"]


def test_commit_does_not_modify_the_callers_metadata(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    partial = store.partial_dir("debian-12-0123456789ab")
    partial.mkdir()
    metadata = {"recipe": "debian-12", "hash": "0123456789ab"}
    store.commit(partial, "debian-12-0123456789ab", metadata)
    assert metadata == {"recipe": "debian-12", "hash": "0123456789ab"}


def test_committing_an_image_another_bake_committed_first_returns_that_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    first = store.root / ".partial-debian-12-0123456789ab-1"
    (first / "rootfs").mkdir(parents=True)
    store.commit(first, "debian-12-0123456789ab", {"recipe": "debian-12", "hash": "0123456789ab"})
    second = store.partial_dir("debian-12-0123456789ab")
    (second / "rootfs").mkdir(parents=True)
    image = store.commit(second, "debian-12-0123456789ab", {"recipe": "debian-12", "hash": "0123456789ab"})
    assert image.directory == store.root / "debian-12-0123456789ab"
    assert not second.exists()


# ---- latest ------------------------------------------------------------------------------------


def test_latest_is_the_newest_image_of_the_recipe(tmp_path: Path) -> None:
    now = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)

    def stamp(hours: int) -> str:
        return (now + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")

    # Names sort opposite to age, so the answer cannot come from name order.
    put_image(tmp_path, "debian-12-aaaaaaaaaaaa", recipe="debian-12", hash="a", created_at=stamp(2))
    put_image(tmp_path, "debian-12-bbbbbbbbbbbb", recipe="debian-12", hash="b", created_at=stamp(0))
    put_image(tmp_path, "debian-12-cccccccccccc", recipe="debian-12", hash="c", created_at=stamp(1))
    put_image(tmp_path, "amazon-linux-2023-dddddddddddd", recipe="amazon-linux-2023", hash="d", created_at=stamp(5))
    put_image(tmp_path, ".partial-debian-12-eeeeeeeeeeee-1", recipe="debian-12", hash="e", created_at=stamp(9))
    store = ImageStore(tmp_path)
    assert store.latest("debian-12").name == "debian-12-aaaaaaaaaaaa"  # type: ignore[union-attr]
    assert store.latest("amazon-linux-2023").name == "amazon-linux-2023-dddddddddddd"  # type: ignore[union-attr]
    assert store.latest("ubuntu-24") is None


def test_latest_after_commits(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    old = store.root / "debian-12-aaaaaaaaaaaa"
    put_image(tmp_path, old.name, recipe="debian-12", hash="a", created_at="2000-01-01T00:00:00Z")
    partial = store.partial_dir("debian-12-ffffffffffff")
    partial.mkdir()
    committed = store.commit(partial, "debian-12-ffffffffffff", {"recipe": "debian-12", "hash": "f"})
    assert store.latest("debian-12") == committed


# ---- stale partials ----------------------------------------------------------------------------


def test_remove_stale_partials_removes_only_those_of_dead_processes(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    dead = dead_pid()
    stale = tmp_path / f".partial-debian-12-0123456789ab-{dead}"
    (stale / "rootfs" / "usr").mkdir(parents=True)
    (stale / "bake.log").write_text("interrupted\n")
    live = store.partial_dir("debian-12-0123456789ab")
    (live / "rootfs").mkdir(parents=True)
    image = put_image(tmp_path, "debian-12-aaaaaaaaaaaa", recipe="debian-12", hash="a")
    no_pid = tmp_path / ".partial-debian-12-0123456789ab-notapid"
    no_pid.mkdir()

    removed = store.remove_stale_partials()

    assert removed == [stale]
    assert not stale.exists()
    assert live.is_dir() and (live / "rootfs").is_dir()
    assert image.is_dir() and no_pid.is_dir()
    assert store.remove_stale_partials() == []


def test_a_partial_of_pid_1_is_kept(tmp_path: Path) -> None:
    """pid 1 always exists; as non-root signalling it is refused (EPERM), which must still mean alive."""
    partial = tmp_path / ".partial-debian-12-0123456789ab-1"
    partial.mkdir()
    assert ImageStore(tmp_path).remove_stale_partials() == []
    assert partial.is_dir()


def test_a_partial_whose_name_holds_dashes_is_judged_by_its_last_part(tmp_path: Path) -> None:
    dead = dead_pid()
    stale = tmp_path / f".partial-amazon-linux-2023-0123456789ab-{dead}"
    live = tmp_path / f".partial-amazon-linux-2023-{dead}-{os.getpid()}"  # an image name ending in digits
    stale.mkdir()
    live.mkdir()
    assert ImageStore(tmp_path).remove_stale_partials() == [stale]
    assert live.is_dir()
