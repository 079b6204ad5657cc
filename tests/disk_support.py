"""A small file system to fill up, for the full-disk tests, in two kinds:

- "tmpfs": a real one, mounted for the test (the tests and CI run as root);
  it skips where mounting is refused.
- "simulated": a plain directory whose file writes, once it is "filled",
  fail with ENOSPC (raised by a patched `open`) whenever they would take
  more space than deletes have freed since; writing over a file's existing
  bytes takes none, as on a real disk. It runs anywhere, so the full-disk
  guarantees are checked on machines that cannot mount too.

Tests take the directory (`small_filesystem`) and use `disk_filled` and
`free_bytes` on it, whichever kind it is.
"""

import builtins
import contextlib
import errno
import io
import os
import subprocess
from pathlib import Path

import pytest

KINDS = ("tmpfs", "simulated")


@contextlib.contextmanager
def small_filesystem(mount_point: Path, kind: str = "tmpfs", size: str = "2m"):
    """A file system of `kind` at `mount_point` for the block's duration."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if kind == "simulated":
        with _simulated(mount_point):
            yield mount_point
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the "
                    "simulated full disk checks the same guarantees")
    try:
        yield mount_point
    finally:
        # Lazy: a server under test may still hold a file open.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    disk = _disk_of(path)
    if disk is not None and disk.capacity is not None:
        return disk.capacity - disk.used()
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def disk_filled(directory: Path):
    """Fills the file system of `directory` up to the last byte (with a
    filler file on a real one), and frees that after the block."""
    disk = _disk_of(directory)
    if disk is not None:
        disk.capacity = disk.used()
        try:
            yield None
        finally:
            disk.capacity = None
        return
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


# ---- the simulated kind -----------------------------------------------------------------

_SIMULATED: dict[str, "_SimulatedDisk"] = {}


class _SimulatedDisk:
    """Space is the bytes of the files under `root`; `capacity` (None: no
    limit) is what they may take in all."""

    def __init__(self, root: Path):
        self.root = os.path.abspath(root)
        self.capacity: int | None = None

    def holds(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def used(self) -> int:
        total = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # deleted meanwhile
                    pass
        return total

    def take(self, growth: int) -> None:
        """Raises ENOSPC unless `growth` more bytes fit."""
        if self.capacity is not None and growth > 0 \
                and self.used() + growth > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _BudgetedFile:
    """A file opened for writing on a simulated disk: each write first asks
    the disk for the bytes it adds beyond the file's end."""

    def __init__(self, file, disk: _SimulatedDisk):
        self._file, self._disk = file, disk

    def write(self, data) -> int:
        self._file.flush()  # the disk's count then holds every earlier write
        end = os.fstat(self._file.fileno()).st_size
        self._disk.take(self._file.tell() + memoryview(data).nbytes - end)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _disk_of(path: Path) -> "_SimulatedDisk | None":
    path = os.path.abspath(path)
    return next((disk for disk in _SIMULATED.values() if disk.holds(path)), None)


@contextlib.contextmanager
def _simulated(root: Path):
    disk = _SimulatedDisk(root)
    _SIMULATED[disk.root] = disk
    real_open = io.open

    def budgeted_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        if not set(mode) & set("wax+"):
            return opened
        # A descriptor (os.fdopen) by the path it has open.
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else file
        owner = _disk_of(os.fspath(path))
        return opened if owner is None else _BudgetedFile(opened, owner)

    # pathlib opens through io.open, the rest through the builtin.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", budgeted_open)
        patch.setattr(io, "open", budgeted_open)
        try:
            yield
        finally:
            del _SIMULATED[disk.root]
