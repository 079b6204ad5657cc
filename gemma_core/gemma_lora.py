"""keras_hub's `.lora.h5` files: LoRA kernels of the query and value layers.

keras_hub keys each LoRA pair by the position of its layer among all layers
with weights in its own traversal order, which for Gemma works out to
`1 + block * stride + offset` (REFERENCE.md gives the no/both post-norm
cases; the mixed ones were read off files keras_hub 0.32 wrote).
"""

from __future__ import annotations

import os
from typing import BinaryIO

import h5py
import numpy as np

from gemma_core.errors import PresetError

LORA_TARGETS = ("query", "value")


def keras_hub_lora_index(block: int, target: str, use_post_attention_norm: bool,
                         use_post_ffw_norm: bool) -> int:
    """keras_hub's key for `target` ("query"/"value") of decoder block `block`.

    Each post norm adds a layer with weights to every block (stride 11, 12
    or 13); the post-ffw norm also comes before the attention in keras_hub's
    traversal, shifting the value layer by one.
    """
    stride = 11 + use_post_attention_norm + use_post_ffw_norm
    index = 1 + block * stride + 7 + use_post_ffw_norm
    return index + 2 if target == "query" else index


def write_lora_file(path: str | os.PathLike | BinaryIO, rank: int,
                    kernels: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """`kernels`: keras_hub index -> (lora_kernel_a, lora_kernel_b); `path`
    may be a binary file object (io.BytesIO) instead of a file name."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("lora")
        group.create_group("vars").create_dataset("rank", data=np.int64(rank))
        for index, (a, b) in sorted(kernels.items()):
            vars_ = group.create_group(f"{index}/vars")
            vars_.create_dataset("lora_kernel_a", data=a)
            vars_.create_dataset("lora_kernel_b", data=b)


# Declared array bytes a file may hold per byte of its size (plus a little):
# room for real compression, none for a small file that inflates to gigabytes.
_MAX_INFLATION = 4
_INFLATION_SLACK = 1 << 16


def _member(group: h5py.Group, name: str, path, where: str):
    """`group[name]` if it is stored in this file itself, else None if absent.

    Soft and external links are refused: reading one would reach another
    place in, or outside, the file system than the file handed to us."""
    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise PresetError(f"{path}: {where} is a link ({type(link).__name__}); LoRA files "
                          "hold their arrays themselves, without links.")
    return group[name]


class _Reader:
    """Reads arrays of one file, refusing any whose data lies outside it
    (external or virtual storage) or that inflate far beyond the file's size."""

    def __init__(self, path):
        self.path = path
        self.budget = _MAX_INFLATION * os.path.getsize(path) + _INFLATION_SLACK

    def array(self, group: h5py.Group, name: str, where: str, kinds: str) -> np.ndarray:
        dataset = _member(group, name, self.path, where)
        if dataset is None:
            raise PresetError(f"{self.path}: {where} is missing.")
        if not isinstance(dataset, h5py.Dataset):
            raise PresetError(f"{self.path}: {where} is a group, not an array.")
        if dataset.is_virtual or dataset.external:
            raise PresetError(f"{self.path}: {where} keeps its data outside the file; LoRA "
                              "files hold their arrays themselves.")
        if dataset.dtype.kind not in kinds:
            kind = "an integer" if kinds == "iu" else "floating point"
            raise PresetError(f"{self.path}: {where} holds {dataset.dtype} values, not "
                              f"{kind} ones.")
        self.budget -= dataset.nbytes
        if self.budget < 0:
            raise PresetError(f"{self.path}: its arrays declare far more bytes than the file "
                              "holds (compressed or unwritten data); write them uncompressed, "
                              "as keras_hub does.")
        return np.asarray(dataset[()])


def read_lora_file(path: str | os.PathLike) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Returns (rank, keras_hub index -> (lora_kernel_a, lora_kernel_b)).

    Raises:
        PresetError: not a readable keras_hub LoRA file, or one whose arrays
            are linked, stored outside it, of the wrong element type, or far
            larger than the file.
    """
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise PresetError(f"{path} is not a readable h5 LoRA file ({error}).") from error
    reader = _Reader(path)
    with handle:
        lora = _member(handle, "lora", path, "lora")
        variables = _member(lora, "vars", path, "lora/vars") \
            if isinstance(lora, h5py.Group) else None
        if not isinstance(variables, h5py.Group) or "rank" not in variables:
            raise PresetError(f"{path} has no 'lora/vars/rank'; it is not a keras_hub "
                              "LoRA file.")
        rank = reader.array(variables, "rank", "lora/vars/rank", "iu")
        if rank.shape != ():
            raise PresetError(f"{path}: lora/vars/rank is an array of shape {rank.shape}, "
                              "not one integer.")
        kernels = {}
        for key in lora:
            if key == "vars":
                continue
            if not (key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")):
                raise PresetError(f"{path}: entry lora/{key} is not a layer index.")
            entry = _member(lora, key, path, f"lora/{key}")
            entry_vars = _member(entry, "vars", path, f"lora/{key}/vars") \
                if isinstance(entry, h5py.Group) else None
            if not isinstance(entry_vars, h5py.Group):
                raise PresetError(f"{path}: entry lora/{key} is malformed (it needs "
                                  "vars/lora_kernel_a and vars/lora_kernel_b).")
            kernels[int(key)] = tuple(
                reader.array(entry_vars, factor, f"lora/{key}/vars/{factor}", "f")
                for factor in ("lora_kernel_a", "lora_kernel_b"))
    return int(rank), kernels
