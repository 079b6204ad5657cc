"""Writes that survive a crash: data fsynced before the rename that makes it
visible, and the directory fsynced after it, so a restart sees the old
file or the new one, whole."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator


@contextlib.contextmanager
def durable_file(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """A file at `path` to write in the block, fsynced after it; a failed
    write removes the file (on a full disk it would hold space and nothing
    useful).

    Args:
        path: the file.
        mode: "wb" for a new file, "r+b" to write over one that exists
            (into the blocks it already holds).
    """
    try:
        with open(path, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_file(path: Path, temporary: Path, *, durable: bool = True, mode: str = "wb",
                   admit: Callable[[Path], None] | None = None,
                   guard: ContextManager | None = None) -> Iterator[BinaryIO]:
    """Creates or replaces `path` at once with what the block writes: it is
    written to `temporary`, then renamed over `path`, so a reader (or a
    restart) finds the old file or the new one, whole. Whatever fails on the
    way (a full disk: OSError ENOSPC), `temporary` is removed and `path` is
    left as it was.

    Args:
        path: the file to create or replace.
        temporary: where to write first: on `path`'s file system (a rename
            does not cross file systems), under a name readers skip.
        durable: fsync the data before the rename and the directory after
            it; without, a crash may lose the new file (not half-write it).
        mode: as `durable_file`'s ("r+b" writes into an existing
            `temporary`, which needs no new space on most file systems).
        admit: called with `temporary`, written, just before the rename; it
            raises to refuse the file.
        guard: held around `admit` and the rename (a lock), so that a check
            and the rename it admits are one step.

    Example:
    >>> with replacing_file(directory / "job.json", directory / "job.tmp") as out:
    ...     out.write(data)
    """
    try:
        if durable:
            with durable_file(temporary, mode) as handle:
                yield handle
        else:
            with open(temporary, mode) as handle:
                yield handle
        with guard if guard is not None else contextlib.nullcontext():
            if admit is not None:
                admit(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


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
