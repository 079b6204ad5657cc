"""A small file system to fill up, for the full-disk tests: a tmpfs mounted
for the test (the tests and CI run as root). Where mounting is refused, the
tests that need one skip, saying why."""

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: str = "2m"):
    """A tmpfs of `size` mounted at `mount_point` for the block's duration."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the "
                    "full-disk tests need root")
    try:
        yield mount_point
    finally:
        # Lazy: a server under test may still hold a file open.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def disk_filled(directory: Path):
    """Fills the file system of `directory` up to the last byte with a filler
    file, and removes it after the block."""
    filler = directory / "filler"
    block = b"\xa5" * (64 << 10)
    with open(filler, "wb", buffering=0) as out:
        for size in (len(block), 4096, 512, 1):
            try:
                while True:
                    out.write(block[:size])
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    try:
        yield filler
    finally:
        filler.unlink(missing_ok=True)
