"""Creating a run's directory and files as root inside a tree the sandbox user owns, without following links.

The working directory belongs to the agent, which could swap `.km-agent` or `runs` for a symlink to
`/etc` just before root creates a run there. Every step here goes through directory file descriptors
opened with O_NOFOLLOW, so root only ever creates and chowns entries inside real directories it
walked to itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def directory_fd(path: Path) -> Iterator[int]:
    """An fd for `path`, walked one component at a time from `/` refusing symlinks below its first level."""
    descriptor = os.open("/", _DIRECTORY_FLAGS)
    try:
        for index, part in enumerate(path.parts[1:]):
            # The first levels (/workspace, /home/...) are the image's; symlinks there are the operator's choice.
            flags = _DIRECTORY_FLAGS if index >= 1 else _DIRECTORY_FLAGS & ~os.O_NOFOLLOW
            child = os.open(part, flags, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
        yield descriptor
    finally:
        os.close(descriptor)


def make_owned_dirs(base: Path, relative: Path, uid: int, gid: int, mode: int = 0o755, *, exclusive: bool = False) -> Path:
    """mkdir -p `base/relative` with each new level owned by uid:gid; refuses symlinked levels.

    `exclusive`: the last level must not exist yet (FileExistsError), so a new run never reuses a dir.
    """
    with directory_fd(base) as descriptor:
        current = os.dup(descriptor)
        try:
            for index, part in enumerate(relative.parts):
                try:
                    os.mkdir(part, mode, dir_fd=current)
                    os.chown(part, uid, gid, dir_fd=current, follow_symlinks=False)
                except FileExistsError:
                    if exclusive and index == len(relative.parts) - 1:
                        raise
                child = os.open(part, _DIRECTORY_FLAGS, dir_fd=current)
                os.close(current)
                current = child
        finally:
            os.close(current)
    return base / relative


def write_owned_file(directory: Path, name: str, content: bytes, uid: int, gid: int, mode: int = 0o644) -> None:
    """Create or replace `directory/name` atomically, owned by uid:gid, never through a symlink."""
    temporary = f".{name}.{os.getpid()}.tmp"
    with directory_fd(directory) as descriptor:
        file_descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=descriptor
        )
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(file_descriptor, view) :]
            os.fchown(file_descriptor, uid, gid)
            os.fchmod(file_descriptor, mode)
            os.fsync(file_descriptor)
        finally:
            os.close(file_descriptor)
        os.rename(temporary, name, src_dir_fd=descriptor, dst_dir_fd=descriptor)
