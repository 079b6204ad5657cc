"""A worker actor as its scheduler sees it: the executor's calls over Ray,
Ray's wrappers turned into our errors."""

from __future__ import annotations

from typing import Any, Callable

from ray.exceptions import RayActorError, RayTaskError

from worker.backbone_worker import ExecutorInfo
from worker.batch import Batch, BatchResult
from worker.errors import WorkerError, WorkerUnavailable
from worker.fine_tune_session import FineTuneWork, StepReport


class RayExecutor:
    """Calls one actor. Batches and results, slot payloads (by object
    reference: Ray resolves them on the worker's side) and training steps
    all travel as Ray calls and objects: one transport.

    Args:
        worker_id: for error messages.
        actor: the `BackboneWorker` actor handle.
        on_died: told the worker id when a call finds the actor dead.
    """

    def __init__(self, worker_id: str, actor, on_died: Callable[[str], None]):
        self.worker_id = worker_id
        self.actor = actor
        self._on_died = on_died

    async def _call(self, ref) -> Any:
        try:
            return await ref
        except RayTaskError as error:
            if isinstance(error.cause, WorkerError):
                raise error.cause from None
            raise
        except RayActorError as error:
            self._on_died(self.worker_id)
            raise WorkerUnavailable(f"{self.worker_id} died while serving the request: "
                                    f"{error}") from error

    async def run_batch(self, batch: Batch) -> BatchResult:
        return await self._call(self.actor.run_batch.remote(batch))

    async def write_slot(self, slot: int, payload) -> None:
        await self._call(self.actor.write_slot.remote(slot, payload))

    async def start_fine_tune(self, work: FineTuneWork) -> None:
        await self._call(self.actor.start_fine_tune.remote(work))

    async def fine_tune_step(self, job_id: str) -> StepReport | None:
        return await self._call(self.actor.fine_tune_step.remote(job_id))

    async def finish_fine_tune(self, job_id: str):
        return await self._call(self.actor.finish_fine_tune.remote(job_id))

    async def drop_fine_tune(self, job_id: str) -> None:
        await self._call(self.actor.drop_fine_tune.remote(job_id))

    async def info(self) -> ExecutorInfo:
        return await self._call(self.actor.info.remote())
