"""Many LoRA adapters in one forward pass: stacked factors, one slot per row.

Each adapted projection gets a table of factors with one entry per slot;
a batch carries a slot index per row, and each row's update is computed
with its own slot's factors. The tables are ordinary arrays passed to the
jitted forward, so writing a slot is data, never a recompilation. Slot 0 is
all zeros: the base model.

Axes: L blocks, S slots, N query heads, K key/value heads, d model width,
R the largest rank, h head size, B rows.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_layout import choose_placements
from gemma_core.lora_adapter import LoraAdapter
from gemma_core.mesh_axes import DATA_AXIS, MODEL_AXIS

Tables = dict  # name -> (L, S, ...) array; see LoraSlotTable.shapes


@dataclasses.dataclass(frozen=True)
class LoraSlotTable:
    """The table layout for one architecture, `num_slots` slots of rank up
    to `max_rank` (smaller ranks are zero-padded, which changes nothing:
    the padded columns of a and rows of b multiply to zero).

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

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_rank < 1:
            raise ValueError(f"a slot table needs num_slots >= 1 and max_rank >= 1, got "
                             f"{self.num_slots} and {self.max_rank}.")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        c, S, R = self.config, self.num_slots, self.max_rank
        L, N, K, d, h = (c.num_layers, c.num_query_heads, c.num_key_value_heads,
                         c.hidden_dim, c.head_dim)
        return {"query_a": (L, S, N, d, R), "query_b": (L, S, R, h),
                "value_a": (L, S, K, d, R), "value_b": (L, S, R, h)}

    def partition_specs(self, axis_sizes: dict[str, int], model_axis: str = MODEL_AXIS,
                        data_axis: str = DATA_AXIS) -> dict[str, tuple]:
        """Table name -> the mesh axis of each of its axes (None: not split).

        The a tables are split like the `lora_kernel_a` weights they stack
        (heads on the model axis, d on the data axis, where the mesh divides
        them), which is what keeps them from costing their full size on
        every device (gemma2_27b at 9 slots of rank 16: 5.4 GiB replicated,
        1.4 GiB a device on a 1x4 mesh). The b tables, R x h per entry,
        are replicated.
        """
        placements = choose_placements([self.config], axis_sizes, model_axis, data_axis)
        a_query = placements[r".*attention/query/lora_kernel_a"]
        a_value = placements[r".*attention/value/lora_kernel_a"]
        return {"query_a": (None, None, *a_query), "query_b": (None,) * 4,
                "value_a": (None, None, *a_value), "value_b": (None,) * 4}

    def zeros(self) -> Tables:
        """Every slot empty (float32, on the host)."""
        return {name: np.zeros(shape, "float32") for name, shape in self.shapes().items()}

    def slot_values(self, adapter: LoraAdapter) -> Tables:
        """One slot's worth of `adapter`: the tables' shapes without the S
        axis, rank zero-padded to `max_rank`, `alpha / rank` folded into b."""
        adapter.check_fits(self.config)
        if adapter.rank > self.max_rank:
            raise ValueError(f"the adapter has rank {adapter.rank}; this worker's slots hold "
                             f"rank {self.max_rank} at most (raise --max-adapter-rank).")
        values = {name: np.zeros(shape[:1] + shape[2:], "float32")
                  for name, shape in self.shapes().items()}
        r = adapter.rank
        for (block, target), (a, b) in adapter.kernels.items():
            values[f"{target}_a"][block, ..., :r] = a
            values[f"{target}_b"][block, :r, :] = b * adapter.scale
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
        """Each row's factors for block `block`:
        {"query": (a (B, N, d, R), b (B, R, h)), "value": (a (B, K, d, R), b (B, R, h))}."""
        return {target: (tables[f"{target}_a"][block][slot_ids],
                         tables[f"{target}_b"][block][slot_ids])
                for target in ("query", "value")}
