"""keras_hub's `.lora.h5` files: LoRA kernels of the query and value layers.

keras_hub keys each LoRA pair by the position of its layer among all layers
with weights in its own traversal order, which for Gemma works out to
`1 + block * stride + offset` (REFERENCE.md gives the no/both post-norm
cases; the mixed ones were read off files keras_hub 0.32 wrote).
"""

from __future__ import annotations

import os

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


def write_lora_file(path: str | os.PathLike, rank: int,
                    kernels: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """`kernels`: keras_hub index -> (lora_kernel_a, lora_kernel_b)."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("lora")
        group.create_group("vars").create_dataset("rank", data=np.int64(rank))
        for index, (a, b) in sorted(kernels.items()):
            vars_ = group.create_group(f"{index}/vars")
            vars_.create_dataset("lora_kernel_a", data=a)
            vars_.create_dataset("lora_kernel_b", data=b)


def read_lora_file(path: str | os.PathLike) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Returns (rank, keras_hub index -> (lora_kernel_a, lora_kernel_b))."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise PresetError(f"{path} is not a readable h5 LoRA file ({error}).") from error
    with handle:
        if "lora/vars/rank" not in handle:
            raise PresetError(f"{path} has no 'lora/vars/rank'; it is not a keras_hub "
                              "LoRA file.")
        rank = int(handle["lora/vars/rank"][()])
        kernels = {}
        for key, group in handle["lora"].items():
            if key == "vars":
                continue
            try:
                kernels[int(key)] = (np.asarray(group["vars/lora_kernel_a"]),
                                     np.asarray(group["vars/lora_kernel_b"]))
            except (KeyError, ValueError) as error:
                raise PresetError(f"{path}: entry lora/{key} is malformed ({error}).") from error
    return rank, kernels
