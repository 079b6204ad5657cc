"""Which worker takes a request: least loaded, adapter already resident
preferred, each tenant within its share of each worker's queue; work a dead
worker never answered is tried on another."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from coordinator import fine_tune_steps
from coordinator.forward_work import AdapterRef, ForwardResult, ForwardWork
from coordinator.worker_placement import WorkerPlacement
from worker.errors import DeadlineExpired, PoolSaturated, WorkerUnavailable
from worker.fine_tune_session import FineTuneWork


class WorkerRouter:
    """Routes over the workers of `placement`.

    A worker that holds the request's adapter counts as less loaded by
    `RESIDENT_BONUS` sequences, so adapters are not loaded everywhere; ties
    go round-robin, so idle workers all get used.

    Args:
        placement: the workers and their schedulers.
        max_queued_sequences: each tenant's share of each worker's queue
            (sequences queued or running).
    """

    RESIDENT_BONUS = 2

    def __init__(self, placement: WorkerPlacement, max_queued_sequences: int = 512):
        self.placement = placement
        self.max_queued_sequences = max_queued_sequences
        self._turn = 0
        self._training: dict[str, int] = dict.fromkeys(placement.schedulers, 0)
        self._cancelled: dict[str, asyncio.Event] = {}

    def _least_loaded(self, adapter_key: str | None = None, exclude=(), weight: int = 0,
                      tenant: str = "") -> str:
        """The worker to send `weight` sequences of `tenant` to.

        The bound is per tenant: a worker holds at most
        `max_queued_sequences` of each tenant's sequences, so one tenant
        filling its share never makes another's calls fail; the sum stays
        bounded because each tenant's tokens in flight are (admission).
        """
        self._turn += 1
        schedulers = self.placement.schedulers
        ids = self.placement.live(exclude)
        roomy = [i for i in ids
                 if schedulers[i].rows_of(tenant) + weight <= self.max_queued_sequences]
        if weight and not roomy:
            raise PoolSaturated(
                f"this tenant already has up to {self.max_queued_sequences} sequences queued "
                f"or running on every worker (its share of each worker's queue); retry after "
                f"{PoolSaturated.retry_after_ms} ms.")
        ids = roomy or ids
        order = ids[self._turn % len(ids):] + ids[: self._turn % len(ids)]

        def load(worker_id):
            scheduler = schedulers[worker_id]
            bonus = (self.RESIDENT_BONUS if adapter_key is not None
                     and scheduler.holds(adapter_key) else 0)
            return scheduler.in_flight() - bonus
        return min(order, key=load)

    async def forward(self, work: ForwardWork, tenant: str = "") -> ForwardResult:
        """Runs `work` of `tenant` on one worker; if that worker dies first, on
        another (nothing has been streamed yet: results arrive whole)."""
        key = work.adapter.key if work.adapter is not None else None
        tried, sent = [], time.monotonic()
        while True:
            if tried and work.timeout_s is not None:  # a retry gets what is left
                left = work.timeout_s - (time.monotonic() - sent)
                if left <= 0:
                    raise DeadlineExpired("the deadline passed while the request was retried "
                                          f"after {', '.join(tried)} failed")
                work, sent = dataclasses.replace(work, timeout_s=left), time.monotonic()
            try:
                worker_id = self._least_loaded(key, exclude=tried, weight=len(work.sequences),
                                               tenant=tenant)
            except WorkerUnavailable:
                if tried:
                    raise WorkerUnavailable(f"{', '.join(tried)} failed while serving the "
                                            "request and no other worker can take it") from None
                raise
            try:
                return await self.placement.schedulers[worker_id].submit(work, tenant)
            except WorkerUnavailable:
                tried.append(worker_id)

    async def load_adapter(self, adapter: AdapterRef) -> tuple[list[str], float]:
        """Makes `adapter` resident on every live worker; returns the workers
        and the slowest load time (ms)."""
        ids = self.placement.live()
        times = await asyncio.gather(*(self.placement.schedulers[i].load(adapter)
                                       for i in ids))
        return ids, max(times)

    def unload_adapters(self, keys: list[str]) -> list[str]:
        """Releases `keys` on every worker; returns the workers that held one
        and freed it now (a slot in use is freed when its rows are done)."""
        freed = []
        for worker_id, scheduler in self.placement.schedulers.items():
            if [key for key in keys if scheduler.unload(key)]:
                freed.append(worker_id)
        return freed

    def fine_tune(self, work: FineTuneWork) -> tuple[str, AsyncIterator[dict]]:
        """Starts `work` on a worker training the fewest jobs (a job slows its
        worker's serving; two on one worker take turns), the least loaded of
        those; returns (worker id, its progress dicts, see
        `fine_tune_steps.train`)."""
        live = self.placement.live()
        fewest = min(self._training[i] for i in live)
        worker_id = self._least_loaded(
            exclude=[i for i, jobs in self._training.items() if jobs > fewest])
        cancelled = self._cancelled[work.job_id] = asyncio.Event()
        self._training[worker_id] += 1

        def ended():
            self._training[worker_id] -= 1
            self._cancelled.pop(work.job_id, None)
        return worker_id, _JobProgress(fine_tune_steps.train(
            self.placement.schedulers[worker_id], work, cancelled), ended)

    def cancel_fine_tune(self, job_id: str) -> None:
        """The job stops at its next step boundary, reporting "cancelled"."""
        cancelled = self._cancelled.get(job_id)
        if cancelled is not None:
            cancelled.set()

    def resident_adapters(self) -> dict[str, list[str]]:
        """worker id -> adapter keys in its slots now (the schedulers write
        the slots, so this is exact); a worker that never came back holds
        none."""
        dead = self.placement.dead()
        return {worker_id: [] if worker_id in dead else scheduler.slots.resident()
                for worker_id, scheduler in self.placement.schedulers.items()}


class _JobProgress:
    """A job's progress dicts; `aclose()` (however far it was read, even
    not at all) ends the job on its worker and frees its place there."""

    def __init__(self, updates, ended):
        self._updates, self._ended = updates, ended

    def __aiter__(self):
        return self._updates

    async def aclose(self) -> None:
        ended, self._ended = self._ended, None
        try:
            await self._updates.aclose()
        finally:
            if ended is not None:
                ended()
