"""keras_hub's `.lora.h5` files: LoRA kernels of the query and value layers.

keras_hub keys each LoRA pair by the position of its layer among all layers
with weights in its own traversal order, which for Gemma works out to
`1 + block * stride + offset` (docs/model.md gives the no/both post-norm
cases; the mixed ones were read off files keras_hub 0.32 wrote). A model
instance and a `LoraAdapter` hold the same pairs keyed by (block, target)
instead; `to_file_kernels` and `from_file_kernels` convert between the two.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Mapping

import h5py
import numpy as np

from gemma_core.errors import PresetError
from gemma_core.gemma_config import GemmaConfig
from gemma_core.lora_targets import KERAS_HUB_TARGETS

LORA_TARGETS = KERAS_HUB_TARGETS

# (lora_kernel_a, lora_kernel_b) of one projection.
Pair = tuple[np.ndarray, np.ndarray]


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


def factor_shapes(config: GemmaConfig, target: str,
                  rank: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """The shapes of a rank-`rank` pair on `target` of any block of `config`:
    a is (heads, d, r), with the query or the key/value head count as the
    projection has, and b is (r, head_dim)."""
    heads = config.num_query_heads if target == "query" else config.num_key_value_heads
    return (heads, config.hidden_dim, rank), (rank, config.head_dim)


def file_layout(config: GemmaConfig) -> dict[int, tuple[int, str]]:
    """keras_hub index -> (block, target), for every query and value
    projection of a model of `config`."""
    return {keras_hub_lora_index(block, target, config.use_post_attention_norm,
                                 config.use_post_ffw_norm): (block, target)
            for block in range(config.num_layers) for target in LORA_TARGETS}


def to_file_kernels(kernels: Mapping[tuple[int, str], Pair],
                    config: GemmaConfig) -> dict[int, Pair]:
    """(block, target) -> pair, keyed by keras_hub index instead (for
    `write_lora_file`)."""
    index_of = {place: index for index, place in file_layout(config).items()}
    return {index_of[place]: pair for place, pair in kernels.items()}


def from_file_kernels(by_index: Mapping[int, Pair], config: GemmaConfig
                      ) -> tuple[dict[tuple[int, str], Pair], list[int]]:
    """The inverse of `to_file_kernels`: the pairs keyed by (block, target),
    and the sorted indices a model of `config` has no projection at."""
    layout = file_layout(config)
    kernels = {layout[index]: pair for index, pair in by_index.items() if index in layout}
    return kernels, sorted(set(by_index) - set(layout))


def write_lora_file(path: str | os.PathLike | BinaryIO, rank: int,
                    kernels: Mapping[int, Pair]) -> None:
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


def read_lora_file(path: str | os.PathLike) -> tuple[int, dict[int, Pair]]:
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
