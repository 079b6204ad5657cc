"""How many bytes a worker needs on each device, before it allocates any.

Three parts, per device of one worker's (data, model) mesh:

- **weights**: exact. The backbone is built shape-only (no memory behind its
  variables) in the requested dtype policy, and every variable is placed by
  `GemmaBackbone.get_layout_map` looked up by its path, exactly as
  `keras.distribution.ModelParallel` places it in the worker. A variable's
  shard on a device has each split axis divided by its mesh axis; the map
  only splits axes the mesh divides, so every device holds the same bytes.
- **adapter slots**: exact per copy. The worker's `LoraSlotTable` for
  `max_adapters + 1` slots of rank `max_adapter_rank`, in the compute dtype,
  split over the mesh by `LoraSlotTable.partition_specs`. Counted twice: a slot write
  builds new tables while a running batch may still read the old ones (they
  are not donated).
- **activations**: an estimate of the peak working memory of the jitted
  forward at `rows x length`, or of the score program after it where that
  is larger, see `activation_terms` for the formula. XLA fuses and
  reuses buffers, so the real peak is usually lower; the estimate is meant to
  err on the side of refusing.

Nothing is allocated and no device is touched (the mesh is placeholders), so
a laptop plans a 16-GPU worker. `coordinator/plan_cli.py` prints it as a table.

Example:
>>> plan = plan_memory("gemma2_9b_en", mesh_shape=(1, 4), dtype="bfloat16",
...                    rows=16, length=1024)
>>> plan.weight_bytes_unsharded, plan.weight_bytes   # all weights; one device's share
(18483411968, 4621761536)
>>> plan.total_bytes <= 0.75 * 80 * 2**30            # JAX's default share of an 80 GB GPU
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax.numpy as jnp
import keras
import numpy as np
from keras.src.backend.common import global_state

from gemma_core.dot_product_attention import BLOCK_SIZE
from gemma_core.token_scores import (BLOCK_PICKS, MAX_CANDIDATES, MAX_TOP_K,
                                     MAX_TOP_K_POSITIONS, RANKED_BLOCK_PICKS)
from gemma_core.gemma_backbone import GemmaBackbone
from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_presets import GEMMA_PRESETS
from gemma_core.lora_slot_table import LoraSlotTable
from gemma_core.mesh_axes import DATA_AXIS, MESH_AXES, MODEL_AXIS

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class WeightShard:
    """One variable and the piece of it each device holds.

    Attributes:
        path: the Keras variable path (what the layout map is matched against).
        shape: the whole variable's shape.
        dtype: its storage dtype (float32 under mixed_bfloat16).
        axes: per dimension, the mesh axis it is split over, or None.
        shard_shape: the block of it on one device.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    shard_shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def bytes_per_device(self) -> int:
        return math.prod(self.shard_shape) * self.itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one worker; see the module docstring.

    Attributes:
        config: the architecture.
        mesh_shape: (data, model).
        dtype: the dtype policy name.
        rows, length: the batch the activations are estimated for.
        weights: every variable with its per-device shard.
        adapter_table_bytes: one device's share of one copy of the adapter
            slot tables (the same on every device).
        activations: the estimate's terms, name -> bytes per device (see
            `activation_terms`).
    """

    config: GemmaConfig
    mesh_shape: tuple[int, int]
    dtype: str
    rows: int
    length: int
    weights: tuple[WeightShard, ...]
    adapter_table_bytes: int
    activations: Mapping[str, int]

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def weight_bytes(self) -> int:
        """Weights on each device (the same on all of them)."""
        return sum(w.bytes_per_device for w in self.weights)

    @property
    def weight_bytes_unsharded(self) -> int:
        """All weights once: num_parameters x bytes per element."""
        return sum(w.bytes for w in self.weights)

    @property
    def adapter_bytes(self) -> int:
        """Adapter slot tables on each device: two copies (see module doc)."""
        return 2 * self.adapter_table_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activations["total"]

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.activation_bytes

    def fits(self, budget_bytes: int) -> bool:
        return self.total_bytes <= budget_bytes


def resolve_config(config: GemmaConfig | str | Mapping[str, Any]) -> GemmaConfig:
    """A GemmaConfig from a config, a built-in preset name or constructor
    kwargs (Keras' own keys such as `dtype` are ignored)."""
    if isinstance(config, GemmaConfig):
        return config
    if isinstance(config, str):
        if config not in GEMMA_PRESETS:
            raise ValueError(f"Unknown built-in preset {config!r}; built-in presets: "
                             f"{', '.join(sorted(GEMMA_PRESETS))}.")
        return GEMMA_PRESETS[config]["config"]
    return GemmaConfig.from_kwargs(config)


@functools.lru_cache(maxsize=32)
def _variables(config: GemmaConfig, dtype: str) -> tuple[tuple[str, tuple, str], ...]:
    """(path, shape, dtype) of every variable the backbone allocates, from a
    build with no memory behind the variables (milliseconds, any size)."""
    # Keras queues variables made in a non-initializing StatelessScope on a
    # global list, and the next StatelessScope to close anywhere initializes
    # them all: a planned 27B model would then be allocated for real. Take
    # ours back off the list.
    pending = global_state.get_global_attribute("uninitialized_variables", [],
                                                set_to_default=True)
    already = len(pending)
    try:
        with keras.StatelessScope(initialize_variables=False):
            backbone = GemmaBackbone(**config.to_kwargs(), dtype=dtype)
        return tuple((v.path, tuple(v.shape), str(v.dtype)) for v in backbone.variables)
    finally:
        del pending[already:]


def placeholder_mesh(mesh_shape: tuple[int, int]) -> keras.distribution.DeviceMesh:
    """A mesh of the worker's shape and axis names over placeholder devices:
    a layout map needs only the shape and names, so no device is touched and
    meshes larger than this machine can be planned."""
    shape = tuple(mesh_shape)
    return keras.distribution.DeviceMesh(
        shape, list(MESH_AXES), devices=np.arange(math.prod(shape)).reshape(shape))


def weight_shards(config: GemmaConfig, mesh_shape: tuple[int, int],
                  dtype: str) -> tuple[WeightShard, ...]:
    """Every variable of `config` in `dtype`, placed on a `mesh_shape` mesh by
    the backbone's own layout map, as ModelParallel places it."""
    mesh = placeholder_mesh(mesh_shape)
    layout_map = GemmaBackbone.get_layout_map(mesh, config=config)
    axis_size = dict(zip(MESH_AXES, mesh_shape))
    shards = []
    for path, shape, var_dtype in _variables(config, dtype):
        layout = layout_map[path]  # the lookup ModelParallel.get_variable_layout does
        axes = tuple(layout.axes) if layout is not None else (None,) * len(shape)
        # The map splits only axes the mesh divides; ceil() is what JAX would
        # pad to if one ever did not, so the figure stays an upper bound.
        shard_shape = tuple(dim if axis is None else -(-dim // axis_size[axis])
                            for dim, axis in zip(shape, axes))
        shards.append(WeightShard(path, shape, var_dtype, axes, shard_shape))
    return tuple(shards)


def _split(layout_map, path: str, axis: int, mesh_shape: tuple[int, int]) -> int:
    """How many ways the layout map splits axis `axis` of the weight at `path`."""
    layout = layout_map[path]
    name = None if layout is None else layout.axes[axis]
    return dict(zip(MESH_AXES, mesh_shape)).get(name, 1)


def activation_terms(config: GemmaConfig, compute_dtype: str, rows: int, length: int,
                     mesh_shape: tuple[int, int] = (1, 1), layer_slots: int = 4,
                     max_adapter_rank: int = 16) -> dict[str, int]:
    """Estimated peak bytes per device of the worker's jitted forward
    (`selected_hidden_states` with per-row adapters) and of its score
    program, term by term.

    With B = rows, T = length, d = hidden_dim, H query and K key/value heads
    of size h, f = intermediate_dim / 2, c = bytes of the compute dtype, S =
    layer_slots, R = the adapter rank:

    - selected: 2 x S*B*T*d*c. The (S, B, T, d) result lives through the
      whole forward, and each layer's write makes a new one from the old.
    - residual: 4 x B*T*d*4. The residual stream, its float32 norm, the
      sub-block output and their sum.
    - attention (one block at a time): the scores are the big term,
      B*H*T*W x (4 + 4 + c, + c more below float32) for the logits, their
      float32 copy and exponentials and the probabilities, where W = T up
      to the attention block (dot_product_attention.BLOCK_SIZE) and the
      block beyond it (longer sequences go a block of keys at a time, so
      this term grows linearly with T); plus q, k, v and their rotated
      float32 copies 2 x B*T*(H+2K)*h*4 and the head outputs B*T*H*h*c; the
      (B, T, W) mask; each row's gathered adapter factors for query, key,
      value (a per-head a and b) and the output, B*((H+2K)*(d*R + R*h) +
      H*h*R + R*d)*4, and their float32 updates B*T*((H+2K)*h + d)*4.
    - feed_forward (one block at a time): 3 x B*T*f*c, both gates and their
      product; each row's gathered adapter factors B*(3*(d*R + R*f))*4 and
      the float32 updates of both gates and the output B*T*(2f + d)*4.
    - scores (the score program, run after the forward for a batch with
      Score rows; token_scores.scores_at): the forward's (S, B, T, d) output
      it reads, S*B*T*d*c, and its copy of the final layer's slot, B*T*d*c;
      a block of n picks through the head (the larger of the two loops'
      blocks, BLOCK_PICKS and RANKED_BLOCK_PICKS, at most the picks),
      3 x n*V*4 (the float32 logits, their log-probabilities and the
      softmax's temporary; the vocabulary is not divided: top-k needs all
      of it), with the n gathered hidden states; the pick lists and their
      outputs, 4 x B*T*4 for token log-probabilities and B*(P+1)*(2k+C+3)*4
      for the ranked ones (P positions, k top-k, C candidates).

    total = max(selected + residual + max(attention, feed_forward), scores).
    (`plan_memory` adds `weight_casts`: under mixed_bfloat16, the bfloat16
    copies of the float32 weights.)

    What divides over the mesh follows the weights, not the rows: the worker
    passes whole batches in, and XLA splits intermediates the way their
    weights are split. So selected and residual are divided by the data axis
    where the layout splits the hidden axis there (it does: fully sharded
    data parallel), attention by the model axis where query heads are split
    there (not under the head_dim fallback), feed_forward by the model axis
    where its width is. The rows are never divided: a larger data axis holds
    less of the weights but the same attention scores. Checked against XLA's
    own `memory_analysis()` (temporaries plus output) on CPU devices, where
    it stays above XLA's figure on every mesh and dtype policy tried (the
    ratios are in benchmarks/README.md, "Figures moved from the code"), and
    tests/core/test_memory_plan.py keeps it at or above XLA's (the scores
    term: on one device, float32 and bfloat16). Not yet
    checked on a GPU, whose XLA fuses differently.

    Example:
    >>> terms = activation_terms(GEMMA_PRESETS["gemma2_2b_en"]["config"],
    ...                          "bfloat16", rows=16, length=1024, mesh_shape=(1, 4))
    >>> terms["total"] == max(terms["selected"] + terms["residual"]
    ...                       + max(terms["attention"], terms["feed_forward"]),
    ...                       terms["scores"])
    True
    """
    if rows < 1 or length < 1 or layer_slots < 1 or max_adapter_rank < 1:
        raise ValueError(f"rows, length, layer_slots and max_adapter_rank must be >= 1, got "
                         f"{rows}, {length}, {layer_slots}, {max_adapter_rank}.")
    c = jnp.dtype(compute_dtype).itemsize
    cfg, B, T, S, R = config, rows, length, layer_slots, max_adapter_rank
    d, h, H, K = cfg.hidden_dim, cfg.head_dim, cfg.num_query_heads, cfg.num_key_value_heads
    f = cfg.intermediate_dim // 2
    layout_map = GemmaBackbone.get_layout_map(placeholder_mesh(mesh_shape), config=cfg)
    hidden_split = _split(layout_map, "token_embedding/embeddings", 1, mesh_shape)
    heads_split = _split(layout_map, "decoder_block_0/attention/query/kernel", 0, mesh_shape)
    ffw_split = _split(layout_map, "decoder_block_0/ffw_gating/kernel", 1, mesh_shape)
    score_bytes = 4 + 4 + c + (c if c < 4 else 0)
    W = min(T, BLOCK_SIZE)  # keys whose scores exist at once per query

    def per_device(nbytes: int, split: int) -> int:
        return -(-nbytes // split)

    terms = {
        "selected": per_device(2 * S * B * T * d * c, hidden_split),
        "residual": per_device(4 * B * T * d * 4, hidden_split),
        # The gathered factors are split like the tables they come from.
        "attention": (per_device(B * H * T * W * score_bytes
                                 + 2 * B * T * (H + 2 * K) * h * 4
                                 + B * T * H * h * c
                                 + B * T * (H + 2 * K) * h * 4
                                 + B * ((H + 2 * K) * (d * R + R * h) + H * h * R) * 4,
                                 heads_split)
                      + B * T * W + B * R * d * 4 + B * T * d * 4),
        "feed_forward": (per_device(3 * B * T * f * c + 2 * B * T * f * 4
                                    + B * 3 * R * f * 4, ffw_split)
                         + B * 3 * d * R * 4 + B * T * d * 4),
    }
    V, ranked = cfg.vocabulary_size, B * (MAX_TOP_K_POSITIONS + 1)
    picks = max(min(BLOCK_PICKS, B * T), min(RANKED_BLOCK_PICKS, ranked))  # the larger block
    terms["scores"] = ((S + 1) * B * T * d * c + 3 * picks * V * 4 + picks * d * c
                       + 4 * B * T * 4 + ranked * (2 * MAX_TOP_K + MAX_CANDIDATES + 3) * 4)
    terms["total"] = max(terms["selected"] + terms["residual"]
                         + max(terms["attention"], terms["feed_forward"]), terms["scores"])
    return terms


def plan_memory(config: GemmaConfig | str | Mapping[str, Any],
                mesh_shape: tuple[int, int] = (1, 1), dtype: str = "float32", *,
                rows: int = 1, length: int = 1, layer_slots: int = 4,
                max_adapters: int = 8, max_adapter_rank: int = 16) -> MemoryPlan:
    """Per-device bytes of a worker serving `config` on a `mesh_shape` mesh.

    Pure: builds nothing with memory and touches no device.

    Args:
        config: a GemmaConfig, a built-in preset name, or constructor kwargs.
        mesh_shape: the worker's (data, model) mesh.
        dtype: the dtype policy ("float32", "bfloat16", "mixed_bfloat16").
        rows, length: the largest padded batch the worker will run.
        layer_slots: layers one batch may return (`--max-layers-per-request`).
        max_adapters, max_adapter_rank: the worker's adapter slots.

    Example:
    >>> plan = plan_memory("gemma_2b_en", (1, 1), "bfloat16", rows=16, length=1024)
    >>> plan.weight_bytes == GEMMA_PRESETS["gemma_2b_en"]["metadata"]["params"] * 2
    True
    """
    config = resolve_config(config)
    mesh_shape = tuple(int(n) for n in mesh_shape)
    if len(mesh_shape) != 2 or min(mesh_shape) < 1:
        raise ValueError(f"mesh_shape must be (data, model) with sizes >= 1, got "
                         f"{mesh_shape}.")
    if max_adapters < 1 or max_adapter_rank < 1:
        raise ValueError(f"max_adapters and max_adapter_rank must be >= 1, got "
                         f"{max_adapters} and {max_adapter_rank}.")
    policy = keras.dtype_policies.get(dtype)
    weights = weight_shards(config, mesh_shape, policy.name)
    # In the compute dtype, as the worker keeps them.
    table = LoraSlotTable(config, max_adapters + 1, max_adapter_rank,
                          dtype=policy.compute_dtype)
    axis_sizes = dict(zip(MESH_AXES, mesh_shape))
    specs = table.partition_specs(axis_sizes, model_axis=MODEL_AXIS, data_axis=DATA_AXIS)
    table_bytes = sum(
        math.prod(dim if axis is None else -(-dim // axis_sizes[axis])
                  for dim, axis in zip(shape, specs[name])) * jnp.dtype(table.dtype).itemsize
        for name, shape in table.shapes().items())
    activations = activation_terms(config, policy.compute_dtype, rows, length, mesh_shape,
                                   layer_slots, max_adapter_rank)
    # mixed_bfloat16 stores float32 and computes in bfloat16: XLA materializes
    # the cast copies (measured: without them the estimate fell below XLA's).
    compute_itemsize = jnp.dtype(policy.compute_dtype).itemsize
    casts = sum(math.prod(w.shard_shape) * compute_itemsize for w in weights
                if w.dtype != policy.compute_dtype)
    activations = {**activations, "weight_casts": casts,
                   "total": activations["total"] + casts}
    return MemoryPlan(
        config=config, mesh_shape=mesh_shape, dtype=policy.name, rows=rows, length=length,
        weights=weights, adapter_table_bytes=table_bytes, activations=activations)
