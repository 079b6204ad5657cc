"""Where each Gemma weight lives on a device mesh.

Megatron-style: heads and the feed-forward width go on the model axis,
the hidden axis on the data axis (fully sharded data parallel). An axis is
sharded only when the mesh axis divides it: keras_hub's map asks to split
gemma_2b_en's single key/value head four ways and crashes (keras_hub issue
1613); here that head is replicated instead, and query heads that do not
divide fall back to splitting head_dim.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from gemma_core.gemma_config import GemmaConfig
from gemma_core.mesh_axes import DATA_AXIS, MODEL_AXIS

# Placeholders in the rules, replaced by the mesh's own axis names.
M, B = "<model axis>", "<data axis>"

# regex (matched against the whole variable path) -> candidate placements,
# best first. Each candidate is one mesh-axis placeholder (or None) per axis.
_RULES: dict[str, tuple[tuple, ...]] = {
    r".*token_embedding/embeddings": ((M, B), (None, B), (None, None)),
    r".*attention/query/kernel": ((M, B, None), (None, B, M), (None, B, None)),
    r".*attention/(key|value)/kernel": ((M, B, None), (None, B, None)),
    r".*attention/attention_output/kernel": ((M, None, B), (None, M, B), (None, None, B)),
    r".*ffw_gating(_2)?/kernel": ((B, M), (None, M), (B, None), (None, None)),
    r".*ffw_linear/kernel": ((M, B), (M, None), (None, B), (None, None)),
    r".*attention/query/lora_kernel_a": ((M, B, None), (None, B, None)),
    r".*attention/value/lora_kernel_a": ((M, B, None), (None, B, None)),
    r".*attention/(query|value)/lora_kernel_b": ((None, None),),
    r".*norm(alization)?/scale": ((None,),),
}


def weight_shapes(config: GemmaConfig) -> dict[str, tuple]:
    """Rule regex -> the shapes of the weights it matches, for `config`."""
    c = config
    f = c.intermediate_dim // 2
    shapes = {
        r".*token_embedding/embeddings": [(c.vocabulary_size, c.hidden_dim)],
        r".*attention/query/kernel": [(c.num_query_heads, c.hidden_dim, c.head_dim)],
        r".*attention/(key|value)/kernel": [(c.num_key_value_heads, c.hidden_dim, c.head_dim)],
        r".*attention/attention_output/kernel": [(c.num_query_heads, c.head_dim, c.hidden_dim)],
        r".*ffw_gating(_2)?/kernel": [(c.hidden_dim, f)],
        r".*ffw_linear/kernel": [(f, c.hidden_dim)],
        r".*norm(alization)?/scale": [(c.hidden_dim,)],
    }
    r = 1  # the LoRA rank axis is never sharded, so its size does not matter
    shapes[r".*attention/query/lora_kernel_a"] = [(c.num_query_heads, c.hidden_dim, r)]
    shapes[r".*attention/value/lora_kernel_a"] = [(c.num_key_value_heads, c.hidden_dim, r)]
    shapes[r".*attention/(query|value)/lora_kernel_b"] = [(r, c.head_dim)]
    return shapes


def _fits(placement: tuple, shape: tuple, axis_sizes: Mapping[str, int]) -> bool:
    return all(name is None or dim % axis_sizes[name] == 0
               for name, dim in zip(placement, shape))


def choose_placements(configs: Iterable[GemmaConfig], axis_sizes: Mapping[str, int],
                      model_axis: str = MODEL_AXIS,
                      data_axis: str = DATA_AXIS) -> dict[str, tuple]:
    """Rule regex -> the first placement that divides for every config.

    Args:
        configs: every architecture the layout must serve.
        axis_sizes: mesh axis name -> size.
        model_axis, data_axis: the mesh's names for the model and data axes
            (default: those of MESH_AXES); a name the mesh lacks is treated
            as size 1 (never sharded).
    """
    names = {M: model_axis if model_axis in axis_sizes else None,
             B: data_axis if data_axis in axis_sizes else None}
    shapes_per_config = [weight_shapes(c) for c in configs]
    chosen = {}
    for pattern, candidates in _RULES.items():
        for candidate in candidates:
            placement = tuple(names[a] if a else None for a in candidate)
            if all(_fits(placement, shape, axis_sizes)
                   for shapes in shapes_per_config for shape in shapes[pattern]):
                break
        else:  # Replicating always fits.
            placement = (None,) * len(candidates[0])
        chosen[pattern] = placement
    return chosen
