"""A backbone sharded over this process's devices, and its jitted forward."""

from __future__ import annotations

import jax
import keras
import numpy as np

from gemma_core import Backbone, GemmaBackbone, read_preset_config
from worker.worker_config import WorkerSpec

MESH_AXES = ("batch", "model")


class ShardedBackbone:
    """Loads `spec.preset` inside `ModelParallel` with the backbone's layout
    map over a (batch, model) mesh of the first `spec.num_devices` devices.

    `run` is the one jitted function the worker calls: layer indices are data,
    so it compiles once per padded (rows, length) shape.
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
        self._jitted = jax.jit(self._forward)

    def _forward(self, values, token_ids, padding_mask, layer_ids):
        with self.backbone.bound_to(values):
            return self.backbone.selected_hidden_states(token_ids, padding_mask, layer_ids)

    def run(self, token_ids: np.ndarray, padding_mask: np.ndarray,
            layer_ids: np.ndarray) -> np.ndarray:
        """(K, B, T, d) hidden states on the host, in the compute dtype."""
        values = [v.value for v in self.backbone.variables]
        return np.asarray(self._jitted(values, token_ids, padding_mask, layer_ids))

    def compiled_functions(self) -> int:
        return self._jitted._cache_size()
