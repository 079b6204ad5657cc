"""The Ray actor: one mesh slice, one sharded backbone, one batcher."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import ml_dtypes
import numpy as np

from worker.dynamic_batcher import DynamicBatcher
from worker.errors import DeadlineExpired
from worker.forward_work import ForwardResult, ForwardWork
from worker.worker_config import WorkerSpec

log = logging.getLogger("gemma_serve.worker")

_OUTPUT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                  "float16": np.float16}


def _pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    if pooling == "last_token":
        return hidden[-1]
    if pooling == "mean":
        return hidden.astype(np.float32).mean(axis=0)
    return hidden


def _undo_ray_niceness() -> None:
    """Ray starts worker processes at niceness 15, so on a shared host the
    device-feeding worker would yield to every client and the coordinator.
    Restore normal priority where the process may (root, CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        log.info("worker keeps Ray's niceness %d (no permission to lower it)", os.nice(0))


class BackboneWorker:
    """Serves forward work for one worker id. Wrap with `ray.remote` (the
    pool does, with the devices and environment this spec needs).

    Its devices are fixed before JAX starts: the pool sets XLA_FLAGS (fake
    CPU devices) or Ray assigns GPUs, so the import of JAX happens here.
    """

    def __init__(self, worker_id: str, spec: WorkerSpec):
        from worker.sharded_backbone import ShardedBackbone  # JAX starts here

        started = time.time()
        _undo_ray_niceness()
        self.worker_id = worker_id
        self.spec = spec
        self.model = ShardedBackbone(spec)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{worker_id}-device")
        self._batcher = DynamicBatcher(spec.batching, self.model.run, self._executor)
        log.info("%s loaded %s on %s in %.1fs", worker_id, spec.preset,
                 self.model.devices, time.time() - started)

    async def forward(self, work: ForwardWork) -> ForwardResult:
        started = time.time()
        if work.timeout_s is not None and work.timeout_s <= 0:
            self._batcher.stats.sequences_cancelled += len(work.sequences)
            raise DeadlineExpired("the deadline passed before the worker received the request")
        deadline = None if work.timeout_s is None else started + work.timeout_s
        per_sequence = await self._batcher.submit(work.sequences, work.layers, deadline)
        dtype = _OUTPUT_DTYPES[work.dtype]
        tensors = [[_pool(hidden[layer], work.pooling).astype(dtype) for layer in work.layers]
                   for hidden in per_sequence]
        log.info("request %s: %d sequences in %.1f ms on %s", work.request_id,
                 len(work.sequences), 1e3 * (time.time() - started), self.worker_id)
        return ForwardResult(self.worker_id, tensors)

    async def info(self) -> dict:
        """Identity, mesh, devices and counters, as plain data."""
        import ray

        stats = self._batcher.stats
        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "mesh_shape": list(self.spec.mesh_shape),
            "devices": [str(d) for d in self.model.devices],
            "in_flight_sequences": self._batcher.in_flight(),
            "batches_run": stats.batches_run,
            "sequences_run": stats.sequences_run,
            "max_sequences_in_a_batch": stats.max_sequences_in_a_batch,
            "compiled_functions": self.model.compiled_functions(),
            "sequences_cancelled": stats.sequences_cancelled,
        }

