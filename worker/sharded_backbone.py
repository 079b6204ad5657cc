"""A backbone sharded over this process's devices, and its jitted forward."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gemma_core import (MESH_AXES, Backbone, GemmaBackbone, LoraAdapter, LoraSlotTable,
                        read_preset_config, token_scores)
from gemma_core.lora_targets import KERAS_HUB_TARGETS
from gemma_core.token_scores import MAX_CANDIDATES, MAX_TOP_K_POSITIONS
from worker.score_picks import ScorePicks
from worker.worker_config import WorkerSpec


class ShardedBackbone:
    """Loads `spec.preset` inside `ModelParallel` with the backbone's layout
    map over a (batch, model) mesh of the first `spec.num_devices` devices.

    `run` is the one jitted function the worker calls: layer indices are data,
    so it compiles once per padded (rows, length) shape; `compile_buckets`
    compiles those shapes ahead, so no request waits for a compilation.
    Scoring rows add a second program per shape, run on the forward's
    output where it lies (`run_scored`), compiled ahead beside it.
    """

    def __init__(self, spec: WorkerSpec):
        devices = jax.devices()
        if len(devices) < spec.num_devices:
            raise RuntimeError(
                f"mesh {spec.mesh_shape} needs {spec.num_devices} devices but this "
                f"worker sees {len(devices)}: {devices}.")
        self.devices = devices[: spec.num_devices]
        mesh = keras.distribution.DeviceMesh(
            spec.mesh_shape, list(MESH_AXES), np.array(self.devices).reshape(spec.mesh_shape))
        _, config = read_preset_config(spec.preset)
        layout_map = GemmaBackbone.get_layout_map(mesh, config=config)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name=MESH_AXES[0])
        overrides = {"dtype": spec.dtype} if spec.dtype else {}
        with distribution.scope():
            self.backbone = Backbone.from_preset(spec.preset, **overrides)
        self.mesh = mesh
        # Adapter slots, split over the mesh like the LoRA kernels they stack.
        self.slot_table = LoraSlotTable(self.backbone.config, spec.max_adapters + 1,
                                        spec.max_adapter_rank,
                                        dtype=self.backbone.compute_dtype)
        specs = self.slot_table.partition_specs(dict(zip(MESH_AXES, spec.mesh_shape)),
                                                model_axis=MESH_AXES[1],
                                                data_axis=MESH_AXES[0])
        table_shardings = {name: jax.sharding.NamedSharding(
                               mesh.backend_mesh, jax.sharding.PartitionSpec(*axes))
                           for name, axes in specs.items()}
        slot_shardings = {name: jax.sharding.NamedSharding(  # one slot: no S axis
                              mesh.backend_mesh, jax.sharding.PartitionSpec(axes[0], *axes[2:]))
                          for name, axes in specs.items()}
        self.lora_tables = jax.device_put(self.slot_table.zeros(), table_shardings)
        # A batch's rows go over the data axis (a batch bucket it does not
        # divide runs replicated); without this every device ran every row.
        self._data_parallel = spec.mesh_shape[0]
        self._row_sharding = jax.sharding.NamedSharding(
            mesh.backend_mesh, jax.sharding.PartitionSpec(MESH_AXES[0]))
        # A function of this instance's own: jit caches are per function.
        self._write = jax.jit(lambda tables, slot, values: LoraSlotTable.write(
            tables, slot, values), in_shardings=(table_shardings, None, slot_shardings),
            out_shardings=table_shardings)
        self._jitted = jax.jit(self._forward)
        self._scores_jitted = jax.jit(self._scores)
        self._layer_slots = spec.batching.layer_slots
        # (rows, length) -> its compiled forward / score program, built by
        # compile_buckets.
        self._compiled: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._compiled_scores: dict[tuple[int, int], jax.stages.Compiled] = {}
        self.fingerprint = self.backbone.fingerprint()
        # Keras walks every layer to list them: once, not per batch (the
        # served backbone gains no variables; `_forward` checks at tracing).
        self._variables = list(self.backbone.variables)

    def _forward(self, values, tables, token_ids, padding_mask, layer_ids, slot_ids):
        if len(values) != len(self.backbone.variables):
            raise RuntimeError("the backbone's variables changed after the worker listed them")
        def hidden(lora):
            with self.backbone.bound_to(values):
                return self.backbone.selected_hidden_states(token_ids, padding_mask,
                                                            layer_ids, lora=lora)
        # Per-row LoRA costs about a third of a forward on all seven
        # projections (mid config on a CPU), mostly gathers and small
        # einsums whatever the adapters hold. So a batch with no adapter row
        # skips it, and one whose adapters touch only query and value (what
        # keras_hub trains) does only those: three branches in the one
        # compiled function, chosen on the device per batch.
        kind = jnp.where(jnp.any(slot_ids > 0),
                         1 + LoraSlotTable.adapts_beyond(tables, slot_ids, KERAS_HUB_TARGETS),
                         0)
        return jax.lax.switch(kind, [
            lambda: hidden(None),
            lambda: hidden((LoraSlotTable.only(tables, KERAS_HUB_TARGETS), slot_ids)),
            lambda: hidden((tables, slot_ids))])

    def _scores(self, values, hidden, final, targets, ranked):
        """`token_scores.scores_at` on layer slot `final` of the forward's
        (K, B, T, d) output."""
        with self.backbone.bound_to(values):
            return token_scores.scores_at(
                self.backbone, hidden[final], targets, ranked,
                token_scores.max_top_k(self.backbone.config.vocabulary_size))

    def _row_split(self, rows: int) -> bool:
        return self._data_parallel > 1 and rows % self._data_parallel == 0

    def compile_buckets(self, shapes) -> float:
        """Compiles the forward and score programs for each padded (rows,
        length) in `shapes` (with JAX's persistent cache on, a program
        compiled before is loaded from it instead), and the slot writer;
        returns the seconds the score programs took."""
        values = [v.value for v in self._variables]
        score_seconds = 0.0
        for rows, length in shapes:
            sharding = self._row_sharding if self._row_split(rows) else None
            batch = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)
            slots = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding)
            layers = jax.ShapeDtypeStruct((self._layer_slots,), jnp.int32)
            forward = self._jitted.lower(values, self.lora_tables, batch, batch, layers,
                                         slots).compile()
            self._compiled[(rows, length)] = forward
            started = time.perf_counter()
            self._compiled_scores[(rows, length)] = self._scores_jitted.lower(
                values, jax.ShapeDtypeStruct(forward.out_info.shape, forward.out_info.dtype,
                                             sharding=forward.output_shardings),
                *self._score_arguments(rows, length)).compile()
            score_seconds += time.perf_counter() - started
        self.write_slot(1, None)  # compiles the writer; slot 1 is empty at start anyway
        return score_seconds

    @staticmethod
    def _score_arguments(rows: int, length: int):
        """The score program's arguments after the hidden states, as shapes."""
        def ints(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32)
        N, M = rows * length, rows * (MAX_TOP_K_POSITIONS + 1)
        return (ints(), (ints(N), ints(N), ints(N), ints()),
                (ints(M), ints(M), ints(M, MAX_CANDIDATES), ints()))

    def _on_device(self, token_ids, padding_mask, layer_ids, slot_ids):
        values = [v.value for v in self._variables]
        if self._row_split(len(token_ids)):
            token_ids, padding_mask, slot_ids = jax.device_put(
                (token_ids, padding_mask, slot_ids), self._row_sharding)
        # A shape compile_buckets did not see (a caller outside the scheduler)
        # compiles here, once, through jit's own cache.
        forward = self._compiled.get(tuple(token_ids.shape), self._jitted)
        return values, forward(values, self.lora_tables, token_ids, padding_mask, layer_ids,
                               slot_ids)

    def run(self, token_ids: np.ndarray, padding_mask: np.ndarray, layer_ids: np.ndarray,
            slot_ids: np.ndarray) -> np.ndarray:
        """(K, B, T, d) hidden states on the host, in the compute dtype; row
        b runs with the adapter in slot `slot_ids[b]` (0: none)."""
        return np.asarray(self._on_device(token_ids, padding_mask, layer_ids, slot_ids)[1])

    def run_scored(self, token_ids: np.ndarray, padding_mask: np.ndarray,
                   layer_ids: np.ndarray, slot_ids: np.ndarray, picks: ScorePicks,
                   hidden_wanted: bool) -> tuple[np.ndarray | None, tuple[np.ndarray, ...]]:
        """`run`, then the head's scores at `picks` computed where the hidden
        states lie: (the hidden states on the host, None unless
        `hidden_wanted`; `token_scores.scores_at`'s four arrays on the host).
        No vocabulary-wide array leaves the device."""
        values, hidden = self._on_device(token_ids, padding_mask, layer_ids, slot_ids)
        program = self._compiled_scores.get(tuple(token_ids.shape), self._scores_jitted)
        i32 = np.int32
        outputs = program(values, hidden, i32(picks.final),
                          (picks.target_rows, picks.target_positions, picks.target_ids,
                           i32(picks.target_count)),
                          (picks.ranked_rows, picks.ranked_positions, picks.ranked_candidates,
                           i32(picks.ranked_count)))
        return (np.asarray(hidden) if hidden_wanted else None,
                tuple(np.asarray(x) for x in outputs))

    def write_slot(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Puts `adapter` (None: zeros) in `slot`. Call from one thread at a
        time: each write starts from the tables the previous one left."""
        values = (self.slot_table.slot_values(adapter) if adapter is not None else
                  {k: np.zeros(v.shape[:1] + v.shape[2:], "float32")
                   for k, v in self.lora_tables.items()})
        # Not donated: a batch may have just read the old tables and not yet
        # dispatched; it keeps using them, and the new ones serve the next.
        self.lora_tables = self._write(self.lora_tables, np.int32(slot), values)
        jax.block_until_ready(self.lora_tables)

    def compiled_functions(self) -> int:
        """Forward and score programs this worker holds: the buckets'
        compiled ahead, and any shape compiled on demand since."""
        return (len(self._compiled) + len(self._compiled_scores) + self._jitted._cache_size()
                + self._scores_jitted._cache_size())

    def compiled_slot_writers(self) -> int:
        return self._write._cache_size()
