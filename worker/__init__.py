"""Ray actors that each own a device-mesh slice and a sharded backbone.

Imports gemma_core and Ray, never the generated gRPC stubs. Public API:
`WorkerSpec` and `BatchingConfig` (what a worker is), `ForwardWork` and
`ForwardResult` (what it is sent and returns), `WorkerPool` (start the
actors, route work; imports Ray), and the errors `DeadlineExpired`,
`WorkerUnavailable`.
"""

from worker.errors import DeadlineExpired, WorkerError, WorkerUnavailable
from worker.forward_work import ForwardResult, ForwardWork
from worker.worker_config import BatchingConfig, WorkerSpec

__all__ = ["BatchingConfig", "DeadlineExpired", "ForwardResult", "ForwardWork",
           "WorkerError", "WorkerSpec", "WorkerUnavailable"]
