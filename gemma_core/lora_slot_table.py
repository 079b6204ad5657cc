"""Many LoRA adapters in one forward pass: stacked factors, one slot per row.

Each adaptable projection gets a table of factors with one entry per slot;
a batch carries a slot index per row, and each row's update is computed
with its own slot's factors. The tables are ordinary arrays passed to the
jitted forward, so writing a slot is data, never a recompilation. Slot 0 is
all zeros: the base model.

Query, key and value tables hold a per-head a *and* a per-head b, a form
that holds both factor forms in use (lora_targets) at their own rank:
keras_hub's per-head a with its shared b repeated over the heads, or PEFT's
shared a repeated over the heads with its b split by head. Writing either
at `heads` times the rank in the other form would cost that many times the
memory and the work.

Axes: L blocks, S slots, N query heads, K key/value heads, d model width,
f feed-forward width, R the largest rank, h head size, B rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_core import lora_targets
from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_layout import choose_placements
from gemma_core.lora_adapter import LoraAdapter
from gemma_core.lora_targets import HEAD_TARGETS, TARGETS
from gemma_core.mesh_axes import DATA_AXIS, MODEL_AXIS

Tables = dict  # "<target>_a" | "<target>_b" -> (L, S, ...) array; see LoraSlotTable.shapes

# The layout rule of each projection's kernel, whose placement the tables follow.
_KERNEL_RULES = {"query": r".*attention/query/kernel",
                 "key": r".*attention/(key|value)/kernel",
                 "value": r".*attention/(key|value)/kernel",
                 "attention_output": r".*attention/attention_output/kernel",
                 "ffw_gating": r".*ffw_gating(_2)?/kernel",
                 "ffw_gating_2": r".*ffw_gating(_2)?/kernel",
                 "ffw_linear": r".*ffw_linear/kernel"}


def to_slot_form(a, b, xp=np):
    """A query/key/value pair in the tables' form: keras_hub's a (..., n, d, r)
    and b (..., r, h), or PEFT's a (..., d, r) and b (..., r, n, h), become
    a (..., n, d, r) and b (..., n, r, h). `xp` is numpy or jax.numpy (the
    trainer converts traced factors with it)."""
    if a.ndim == b.ndim + 1:                                      # keras_hub form
        n = a.shape[-3]
        return a, xp.broadcast_to(b[..., None, :, :], b.shape[:-2] + (n,) + b.shape[-2:])
    n = b.shape[-2]                                               # PEFT form
    a = xp.broadcast_to(a[..., None, :, :], a.shape[:-2] + (n,) + a.shape[-2:])
    return a, xp.swapaxes(b, -3, -2)


@dataclasses.dataclass(frozen=True)
class LoraSlotTable:
    """The table layout for one architecture: `num_slots` slots of rank up to
    `max_rank` on each projection in `targets` (smaller ranks are
    zero-padded, which changes nothing: the padded columns of a and rows of
    b multiply to zero; projections an adapter leaves alone stay zero),
    stored in `dtype` (the worker's compute dtype: a bfloat16 model keeps
    them in bfloat16, half the memory; the updates are computed in float32
    either way).

    Example:
    >>> table = LoraSlotTable(backbone.config, num_slots=9, max_rank=16)
    >>> tables = table.zeros()
    >>> tables = table.write(tables, 3, table.slot_values(adapter))
    >>> hidden = backbone.selected_hidden_states(ids, mask, layer_ids,
    ...                                          lora=(tables, slot_per_row))
    """

    config: GemmaConfig
    num_slots: int
    max_rank: int
    targets: Sequence[str] = TARGETS
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_rank < 1:
            raise ValueError(f"a slot table needs num_slots >= 1 and max_rank >= 1, got "
                             f"{self.num_slots} and {self.max_rank}.")
        targets = tuple(map(lora_targets.canonical_target, self.targets))
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"a slot table needs distinct targets, got {self.targets!r}.")
        # In the model's order, so the table's names list the same way for every caller.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    def pair_shapes(self, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One slot's (a, b) shapes on `target` of one block."""
        c, R = self.config, self.max_rank
        if target in HEAD_TARGETS:
            n = lora_targets.heads(c, target)
            return (n, c.hidden_dim, R), (n, R, c.head_dim)
        return lora_targets.factor_shapes(c, target, R)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Table name -> (L, S, *pair shape):
        query_a (L, S, N, d, R), query_b (L, S, N, R, h), key/value the same
        with K heads, attention_output_a (L, S, N, h, R) and _b (L, S, R, d),
        ffw_gating(_2)_a (L, S, d, R) and _b (L, S, R, f), ffw_linear_a
        (L, S, f, R) and _b (L, S, R, d); and each target's _used (L, S),
        which lets a batch skip the projections none of its rows adapts."""
        lead = (self.config.num_layers, self.num_slots)
        shapes = {}
        for target in self.targets:
            a, b = self.pair_shapes(target)
            shapes[f"{target}_a"], shapes[f"{target}_b"] = lead + a, lead + b
            shapes[f"{target}_used"] = lead  # 1 where the slot adapts that block's target
        return shapes

    def partition_specs(self, axis_sizes: dict[str, int], model_axis: str = MODEL_AXIS,
                        data_axis: str = DATA_AXIS) -> dict[str, tuple]:
        """Table name -> the mesh axis of each of its axes (None: not split).

        Each table is split like the kernel it adapts: a along the kernel's
        input axes (and heads), b along its output axes (and heads); the rank
        axis never. That keeps the tables from costing their full size on
        every device (gemma2_27b at 9 slots of rank 16 on all seven
        projections: 10.8 GiB replicated, 1.9 GiB a device on a 2x4 mesh).
        """
        placements = choose_placements([self.config], axis_sizes, model_axis, data_axis)
        specs = {}
        for target in self.targets:
            p = placements[_KERNEL_RULES[target]]
            if target in HEAD_TARGETS:          # kernel (n, d, h)
                a, b = (p[0], p[1], None), (p[0], None, p[2])
            elif target == "attention_output":  # kernel (n, h, d)
                a, b = (p[0], p[1], None), (None, p[2])
            else:                               # kernel (in, out)
                a, b = (p[0], None), (None, p[1])
            specs[f"{target}_a"], specs[f"{target}_b"] = (None, None, *a), (None, None, *b)
            specs[f"{target}_used"] = (None, None)
        return specs

    def zeros(self) -> Tables:
        """Every slot empty (in `dtype`, on the host)."""
        return {name: np.zeros(shape, jnp.dtype(self.dtype))
                for name, shape in self.shapes().items()}

    def slot_values(self, adapter: LoraAdapter) -> Tables:
        """One slot's worth of `adapter`: the tables' shapes without the S
        axis, every pair's rank zero-padded to `max_rank` and its scale
        folded into b.

        Raises:
            AdapterMismatch: the adapter does not fit the config.
            ValueError: it adapts a projection these tables lack, or a pair's
                rank is above `max_rank`.
        """
        adapter.check_fits(self.config)
        others = [t for t in adapter.targets if t not in self.targets]
        if others:
            raise ValueError(f"the adapter adapts {others}; these slots hold "
                             f"{list(self.targets)} only.")
        rank = adapter.largest_rank
        if rank > self.max_rank:
            raise ValueError(f"the adapter has rank {rank}; this worker's slots hold "
                             f"rank {self.max_rank} at most (raise --max-adapter-rank).")
        values = {name: np.zeros(shape[:1] + shape[2:], "float32")
                  for name, shape in self.shapes().items()}
        for (block, target), (a, b) in adapter.kernels.items():
            r = adapter.pair_rank((block, target))
            scaled = (b * adapter.pair_scale((block, target))).astype("float32")
            a, b = to_slot_form(a, scaled) if target in HEAD_TARGETS else (a, scaled)
            values[f"{target}_a"][block, ..., :r] = a
            values[f"{target}_b"][block, ..., :r, :] = b
            values[f"{target}_used"][block] = 1.0
        return values

    @staticmethod
    def write(tables: Tables, slot, values: Tables) -> Tables:
        """`tables` with slot `slot` replaced by `values` (pure; jit-able with
        `slot` traced, so one compilation serves every slot)."""
        return {name: jax.lax.dynamic_update_index_in_dim(
                    table, values[name].astype(table.dtype), slot, axis=1)
                for name, table in tables.items()}

    @staticmethod
    def rows(tables: Tables, block: int, slot_ids) -> dict:
        """Each row's factors for block `block`, for the targets the tables
        hold: {target: (a (B, *a pair shape), b (B, *b pair shape))}."""
        return {target: (tables[f"{target}_a"][block][slot_ids],
                         tables[f"{target}_b"][block][slot_ids])
                for target in TARGETS if f"{target}_a" in tables}

    @staticmethod
    def only(tables: Tables, targets: Sequence[str]) -> Tables:
        """The tables of `targets` alone: a forward given them skips the
        other projections' LoRA work."""
        return {name: table for name, table in tables.items()
                if name.rsplit("_", 1)[0] in targets}

    @staticmethod
    def adapts_beyond(tables: Tables, slot_ids, targets: Sequence[str]):
        """Whether any row's slot adapts a projection not in `targets` (a
        traced boolean, from the _used entries; True for a projection
        without them, which cannot be ruled out)."""
        others = [name.removesuffix("_a") for name in tables
                  if name.endswith("_a") and name.removesuffix("_a") not in targets]
        if any(f"{target}_used" not in tables for target in others):
            return jnp.ones((), bool)
        used = [tables[f"{target}_used"][:, slot_ids] for target in others]
        return jnp.any(jnp.stack(used) > 0) if used else jnp.zeros((), bool)
