"""Ray actors that execute: each owns a device-mesh slice and a sharded
backbone, and runs the batches, slot writes and training steps its
scheduler (in the coordinator) sends.

Imports gemma_core and Ray, never the generated gRPC stubs. Public API:
`WorkerSpec` and `BatchingConfig` (what a worker is), `Batch`, `BatchRow`
and `BatchResult` (what it runs and returns), and the errors. The actor
class is `worker.backbone_worker.BackboneWorker` (it starts JAX when
constructed), started with `worker.actor_options.actor_options`.
"""

from worker.batch import Batch, BatchResult, BatchRow
from worker.errors import DeadlineExpired, WorkerError, WorkerUnavailable
from worker.worker_config import BatchingConfig, WorkerSpec

__all__ = ["Batch", "BatchResult", "BatchRow", "BatchingConfig", "DeadlineExpired",
           "WorkerError", "WorkerSpec", "WorkerUnavailable"]
