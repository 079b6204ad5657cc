"""A safetensors file read tensor by tensor with plain reads, not mmap.

safetensors' own `safe_open` maps the file: every page it reads stays in the
process's RSS until the mapping goes, so loading a checkpoint showed the whole
file on top of the loaded weights (two copies, as RSS counts them). Reading
each tensor into a fresh numpy buffer leaves the file's pages in the kernel's
page cache only, and holds one tensor at a time.

Layout: an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets} (plus an optional `__metadata__`), then the data,
with offsets relative to its start.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
}
# What safetensors itself accepts; a larger claimed header is corruption, and
# reading it would be a huge allocation.
_MAX_HEADER_BYTES = 100_000_000


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # The C library Python runs on.
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hands memory freed since the last call back to the OS.

    Loading frees a buffer per tensor: ours, and the zeros XLA held until the
    assign. Once glibc has freed a large block it raises its mmap threshold
    (up to 32 MB) and serves smaller blocks from its heap, which keeps what
    they free resident, so without this the peak grows well past one copy
    of the weights (figures in benchmarks/README.md, "Figures moved from
    the code"). Tensors over 32 MB are mmapped by malloc anyway.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (message says why)."""


class SafetensorsFile:
    """Open file, parsed and checked header; `read(name)` returns a fresh,
    writable array. Reads seek a shared file object: one thread at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        # Unbuffered: reads go straight into the numpy buffer, no extra copy.
        self._file = open(self.path, "rb", buffering=0)
        try:
            self._tensors = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{size} bytes, shorter than the header length")
        header_bytes = int.from_bytes(self._read_into(0, bytearray(8)), "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise SafetensorsError(f"header length {header_bytes} does not fit in "
                                   f"a {size}-byte file")
        try:
            header = json.loads(self._read_into(8, bytearray(header_bytes)))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"header is not JSON: {error}") from error
        if not isinstance(header, dict):
            raise SafetensorsError("header is not a JSON object")
        data_start, data_bytes = 8 + header_bytes, size - 8 - header_bytes
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _entry(name, info)
            # Checked here so that a truncated or corrupt file fails on open,
            # and no read allocates more than the file holds.
            if not 0 <= begin <= end <= data_bytes:
                raise SafetensorsError(f"tensor {name!r} has data_offsets "
                                       f"[{begin}, {end}] outside the "
                                       f"{data_bytes} bytes of data")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"tensor {name!r} of {dtype} {list(shape)} "
                                       f"needs {math.prod(shape) * dtype.itemsize} "
                                       f"bytes, its offsets span {end - begin}")
            tensors[name] = (dtype, shape, data_start + begin)
        return tensors

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def read(self, name: str) -> np.ndarray:
        """A fresh array; the caller is expected to drop the previous one, so
        loading holds one tensor at a time."""
        release_freed_memory()
        dtype, shape, offset = self._tensors[name]
        array = np.empty(shape, dtype)
        # As bytes: memoryview cannot export ml_dtypes' bfloat16 directly.
        self._read_into(offset, array.reshape(-1).view(np.uint8))
        return array

    def _read_into(self, offset: int, buffer):
        """Fills `buffer` from `offset` and returns it. Loops because one read
        returns at most ~2 GB on Linux, less than a large embedding."""
        view = memoryview(buffer)
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise SafetensorsError(f"file ends {len(view) - done} bytes early "
                                       "(truncated while open?)")
            done += got
        return buffer

    def close(self) -> None:
        self._file.close()


def _entry(name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise SafetensorsError(f"tensor {name!r} has no {{dtype, shape, data_offsets}}")
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise SafetensorsError(f"tensor {name!r} has dtype {info.get('dtype')!r}; "
                               f"supported: {sorted(_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise SafetensorsError(f"tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(map(_is_count, offsets))):
        raise SafetensorsError(f"tensor {name!r} has data_offsets {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(value) -> bool:
    # bool is an int in Python: JSON true must not pass for 1.
    return type(value) is int and value >= 0
