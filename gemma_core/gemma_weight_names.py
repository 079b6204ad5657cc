"""How each GemmaBackbone variable is named in keras_hub and Hugging Face files.

Our variable paths follow keras_hub's in memory
(`decoder_block_3/attention/query/kernel`); its `.weights.h5` files name
layers differently (by class, `gemma_decoder_block_3/attention/query_dense`),
and Hugging Face names and lays out tensors its own way.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

_BLOCK_PATH = re.compile(r"^decoder_block_(\d+)/(.+)$")

# Our path inside a block -> keras_hub h5 group inside `gemma_decoder_block_N`.
_KERAS_HUB_IN_BLOCK = {
    "pre_attention_norm/scale": "pre_attention_norm",
    "post_attention_norm/scale": "post_attention_norm",
    "pre_ffw_norm/scale": "pre_ffw_norm",
    "post_ffw_norm/scale": "post_ffw_norm",
    "attention/query/kernel": "attention/query_dense",
    "attention/key/kernel": "attention/key_dense",
    "attention/value/kernel": "attention/value_dense",
    "attention/attention_output/kernel": "attention/output_dense",
    "ffw_gating/kernel": "gating_ffw",
    "ffw_gating_2/kernel": "gating_ffw_2",
    "ffw_linear/kernel": "ffw_linear",
}
_KERAS_HUB_TOP = {
    "token_embedding/embeddings": "reversible_embedding",
    "final_normalization/scale": "rms_normalization",
}


def split_block_path(path: str) -> tuple[int | None, str]:
    """`decoder_block_3/ffw_linear/kernel` -> (3, "ffw_linear/kernel")."""
    match = _BLOCK_PATH.match(path)
    if match is None:
        return None, path
    return int(match.group(1)), match.group(2)


def keras_hub_block_group(index: int) -> str:
    return "gemma_decoder_block" if index == 0 else f"gemma_decoder_block_{index}"


def keras_hub_group(path: str) -> str:
    """The h5 group (without `/vars/0`) holding our variable `path`."""
    index, inner = split_block_path(path)
    if index is None:
        return f"layers/{_KERAS_HUB_TOP[inner]}"
    return f"layers/{keras_hub_block_group(index)}/{_KERAS_HUB_IN_BLOCK[inner]}"


# ---- Hugging Face -------------------------------------------------------------

Transform = Callable[[np.ndarray, tuple], np.ndarray]


def _same(w, shape):
    return w


def _transpose(w, shape):
    return w.T


def _heads_in(w, shape):
    # (N*hd, d) -> (N, hd, d) -> (N, d, hd)
    n, d, hd = shape
    return w.reshape(n, hd, d).transpose(0, 2, 1)


def _heads_out(w, shape):
    # (d, N*hd) -> (d, N, hd) -> (N, hd, d)
    n, hd, d = shape
    return w.reshape(d, n, hd).transpose(1, 2, 0)


def _hf_in_block(model_type: str) -> dict[str, tuple[str, Transform]]:
    names = {
        "pre_attention_norm/scale": ("input_layernorm.weight", _same),
        "attention/query/kernel": ("self_attn.q_proj.weight", _heads_in),
        "attention/key/kernel": ("self_attn.k_proj.weight", _heads_in),
        "attention/value/kernel": ("self_attn.v_proj.weight", _heads_in),
        "attention/attention_output/kernel": ("self_attn.o_proj.weight", _heads_out),
        "ffw_gating/kernel": ("mlp.gate_proj.weight", _transpose),
        "ffw_gating_2/kernel": ("mlp.up_proj.weight", _transpose),
        "ffw_linear/kernel": ("mlp.down_proj.weight", _transpose),
    }
    if model_type == "gemma":
        names["pre_ffw_norm/scale"] = ("post_attention_layernorm.weight", _same)
    else:  # gemma2 renamed the norms when it added post-norms.
        names["post_attention_norm/scale"] = ("post_attention_layernorm.weight", _same)
        names["pre_ffw_norm/scale"] = ("pre_feedforward_layernorm.weight", _same)
        names["post_ffw_norm/scale"] = ("post_feedforward_layernorm.weight", _same)
    return names


def hf_tensor(path: str, model_type: str) -> tuple[str, Transform]:
    """The Hugging Face tensor name (without `model.`) for our variable `path`,
    and the function that turns it into our layout given our shape."""
    index, inner = split_block_path(path)
    if index is None:
        top = {"token_embedding/embeddings": "embed_tokens.weight",
               "final_normalization/scale": "norm.weight"}
        return top[inner], _same
    name, transform = _hf_in_block(model_type)[inner]
    return f"layers.{index}.{name}", transform

