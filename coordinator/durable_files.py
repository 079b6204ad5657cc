"""Writes that survive a crash: data fsynced before the rename that makes it
visible, and the directory fsynced after it, so a restart sees the old
file or the new one, whole."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def durable_file(path: Path) -> Iterator[BinaryIO]:
    """A new file at `path` to write in the block, fsynced after it; a
    failed write removes the partial file (on a full disk it would hold
    space and nothing useful)."""
    try:
        with open(path, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_durably(path: Path, data: bytes) -> None:
    """Writes `data` to `path` as `durable_file` does."""
    with durable_file(path) as handle:
        handle.write(data)


def fsync_dir(path: Path) -> None:
    """Makes the renames and deletes in directory `path` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_dirs(path: Path, root: Path) -> None:
    """mkdir -p below `root`, fsyncing the parent of each directory made."""
    if path == root or path.is_dir():
        return
    make_dirs(path.parent, root)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)
