"""One worker's scheduler: its queue, its batches, its adapter slots, its
fine-tune turns.

Runs on the coordinator's event loop; the worker (an `Executor`) only runs
what this sends it. Rows of any requests, tenants and adapters share
padded (rows, length) buckets; tenants are served fair shares of tokens
(coordinator/fair_queue.py); rows cancelled or past their deadline are
dropped before dispatch; up to `MAX_IN_FLIGHT` batches or training steps
are out at once, so the next batch is already on the worker when the
device finishes the last one. Adapter slots are written here before a
batch that reads them is sent, and never rewritten while a queued or
running row uses them, so a batch never waits for a load and nothing
recompiles (slots are data).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import time

import numpy as np

from coordinator.adapter_slot_table import AdapterSlotTable, SlotEntry
from coordinator.batch_policy import BatchPolicy
from coordinator.device_timeline import DeviceTimeline
from coordinator.executor import Executor
from coordinator.fair_queue import FairQueue
from coordinator.forward_work import AdapterRef, ForwardResult, ForwardWork
from coordinator.queued_row import QueuedRow
from coordinator.scheduler_stats import SchedulerStats
from worker.batch import Batch
from worker.errors import AdapterSlotsBusy, DeadlineExpired, WorkerUnavailable, own_copy
from worker.worker_config import BatchingConfig

log = logging.getLogger("gemma_serve.scheduler")

MAX_IN_FLIGHT = 2


@dataclasses.dataclass
class TrainingTurn:
    """A granted turn; the step sets `device_seconds` (the cost model's)."""

    flight: int
    device_seconds: float | None = None


class WorkerScheduler:
    """Schedules one worker.

    Args:
        worker_id: for results and errors.
        executor: the worker.
        config: buckets, token budget, waiting.
        num_slots: the worker's adapter slots (besides the base model).
    """

    def __init__(self, worker_id: str, executor: Executor, config: BatchingConfig,
                 num_slots: int):
        self.worker_id = worker_id
        self.executor = executor
        self.config = config
        self.slots = AdapterSlotTable(num_slots)
        self.stats = SchedulerStats()
        self.policy = BatchPolicy(config)
        self.down = False
        self._queue: FairQueue[QueuedRow] = FairQueue()
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # batches and writes: strong refs
        self._writes: dict[SlotEntry, asyncio.Task] = {}
        self._slot_freed = asyncio.Event()
        self._in_flight = 0
        self._running_rows = 0
        self._tenant_rows: collections.Counter[str] = collections.Counter()
        self._timeline = DeviceTimeline()  # when the device should be done
        self._step_seconds = 0.0
        self._training: collections.deque[asyncio.Future] = collections.deque()
        self._batches_since_step = 0

    # --- what routing reads ---------------------------------------------

    def in_flight(self) -> int:
        """Rows queued or running."""
        return len(self._queue) + self._running_rows

    def rows_of(self, tenant: str) -> int:
        """`tenant`'s rows queued or running."""
        return self._tenant_rows[tenant]

    def holds(self, key: str) -> bool:
        return self.slots.get(key) is not None

    def _refuse_if_down(self) -> None:
        if self.down:
            raise WorkerUnavailable(f"{self.worker_id} is restarting")

    # --- forward ----------------------------------------------------------

    async def submit(self, work: ForwardWork, tenant: str = "") -> ForwardResult:
        """Runs `work`'s sequences in whatever batches suit; returns each one's
        tensors. Cancelling the caller drops its rows that have not been sent.

        Raises:
            WorkerUnavailable: the worker is down (or went down meanwhile).
            DeadlineExpired, AdapterSlotsBusy: the deadline passed first.
            AdapterRejected: the adapter does not fit the worker's slots.
        """
        self._refuse_if_down()
        cfg = self.config
        if not 1 <= len(work.layers) <= cfg.layer_slots:
            raise ValueError(f"{len(work.layers)} layers requested; a batch holds 1 to "
                             f"{cfg.layer_slots}.")
        for sequence in work.sequences:
            if not 1 <= len(sequence) <= cfg.max_sequence_length:
                raise ValueError(f"a sequence of {len(sequence)} tokens; this worker takes "
                                 f"1 to {cfg.max_sequence_length}.")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = None if work.timeout_s is None else started + work.timeout_s
        self.stats.forward_requests += 1
        self.policy.arrived(started, len(work.sequences))
        scores = work.scores or (None,) * len(work.sequences)
        rows = [QueuedRow(np.asarray(s, "int32"), work, tenant, deadline,
                          loop.create_future(), next(self._arrivals), started, score=score)
                for s, score in zip(work.sequences, scores, strict=True)]
        for row in rows:
            if row.adapter is not None:
                self._claim(row)
            self._queue.push(row)
            self._tenant_rows[tenant] += 1
        # So that an expired row is dropped on time; cancelled once answered,
        # so long deadlines do not pile up timers.
        timer = None if deadline is None else loop.call_at(deadline, self._wake.set)
        self._start()
        self._wake.set()
        try:
            tensors = list(await asyncio.gather(*(row.future for row in rows)))
        except BaseException:
            for row in rows:
                row.future.cancel()  # no-op for rows already done
            self._wake.set()  # so the loop drops them now
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return ForwardResult(self.worker_id, tensors, round(1e3 * (loop.time() - started), 2))

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())

    def _in_background(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()

    # --- adapter slots ------------------------------------------------------

    def _claim(self, row: QueuedRow) -> None:
        """Gives `row` its adapter's slot (writing it first if new); leaves
        it without one while every slot is pinned by other adapters' rows."""
        claimed = self.slots.claim(row.adapter)
        if claimed is not None:
            row.entry, new = claimed
            if new:
                self._write(row.entry)

    def _write(self, entry: SlotEntry) -> asyncio.Task:
        task = self._in_background(self._write_slot(entry))
        self._writes[entry] = task

        def forget(done):
            if self._writes.get(entry) is done:
                del self._writes[entry]
        task.add_done_callback(forget)
        return task

    async def _write_slot(self, entry: SlotEntry) -> Exception | None:
        """Writes the slot; returns the error that failed it (its rows are
        failed with it here), or None. Returned, not raised: rows hear it
        through their futures, an explicit load from this result."""
        try:
            await self.executor.write_slot(entry.slot, entry.adapter.payload)
        except Exception as error:
            self.slots.failed(entry)
            self._fail_rows([r for r in self._queue if r.entry is entry], error)
            return error
        except BaseException:
            self.slots.failed(entry)
            raise
        else:
            self.slots.written(entry)
            return None
        finally:
            self._slot_freed.set()  # a written slot with no rows is evictable
            self._wake.set()

    async def load(self, adapter: AdapterRef) -> float:
        """Makes `adapter` resident; returns how long that took (ms; 0 if it
        was resident already). Waits while every slot is pinned."""
        started = time.perf_counter()
        self._refuse_if_down()
        while (claimed := self.slots.claim(adapter)) is None:
            self._slot_freed.clear()
            await self._slot_freed.wait()
            self._refuse_if_down()
        entry, new = claimed
        try:
            task = self._write(entry) if new else self._writes.get(entry)
            if task is not None:
                error = await asyncio.shield(task)
                if error is not None:
                    raise error
        finally:
            self._unpin(entry)
        return 1e3 * (time.perf_counter() - started) if task is not None else 0.0

    def unload(self, key: str) -> bool:
        """Frees `key`'s slot now (True) or once its rows are done (False)."""
        freed = self.slots.unload(key)
        if freed:
            self._slot_freed.set()
            self._wake.set()
        return freed

    def _unpin(self, entry: SlotEntry) -> None:
        if self.slots.unpin(entry):
            self._slot_freed.set()
            self._wake.set()

    async def rewrite_slots(self) -> list[str]:
        """After the worker restarted (its table is zeros): writes every
        adapter the table holds again (after any write still in flight);
        returns the keys that failed."""
        pending = [t for t in self._writes.values() if not t.done()]
        await asyncio.gather(*pending, return_exceptions=True)
        entries = self.slots.forget_writes()
        outcomes = await asyncio.gather(*(self._write(e) for e in entries),
                                        return_exceptions=True)
        return [e.key for e, outcome in zip(entries, outcomes) if outcome is not None]

    # --- fine-tune turns ----------------------------------------------------

    @contextlib.asynccontextmanager
    async def training_turn(self):
        """Holds the worker for one training step: granted between forward
        batches (when both wait, they alternate), counted in flight. Yields
        a `TrainingTurn`, whose `device_seconds` the step should set."""
        self._refuse_if_down()
        waiting = asyncio.get_running_loop().create_future()
        self._training.append(waiting)
        self._start()
        self._wake.set()
        try:
            turn = await waiting
        except BaseException:
            if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
                self._step_ended(waiting.result())  # granted as we were cancelled
            else:
                waiting.cancel()
            raise
        try:
            yield turn
        finally:
            if turn.device_seconds is not None:
                self._step_seconds = turn.device_seconds
            self._step_ended(turn)

    def _step_ended(self, turn: TrainingTurn) -> None:
        self._in_flight -= 1
        self._timeline.ended(turn.flight)
        self._wake.set()

    def _expect(self, seconds: float) -> int:
        return self._timeline.sent(asyncio.get_running_loop().time(), seconds)

    def _grant_training_turn(self) -> bool:
        while self._training and self._training[0].done():  # cancelled waiters
            self._training.popleft()
        if not self._training or self.down:
            return False
        if self._batches_since_step == 0 and any(r.ready for r in self._queue):
            return False  # a forward batch first: they take turns
        self._in_flight += 1
        self._training.popleft().set_result(TrainingTurn(self._expect(self._step_seconds)))
        self._batches_since_step = 0
        return True

    # --- failures -----------------------------------------------------------

    def _fail_rows(self, rows: list[QueuedRow], error: BaseException) -> None:
        for row in rows:
            if not row.future.done():
                row.future.set_exception(own_copy(error))
        self._remove(rows)

    def worker_down(self, error: WorkerUnavailable) -> None:
        """The worker died: take nothing more until `worker_up`, and fail
        what was queued (rows and training turns) with `error`, for the
        router to retry elsewhere."""
        self.down = True
        self._fail_rows(list(self._queue), error)
        while self._training:
            waiting = self._training.popleft()
            if not waiting.done():
                waiting.set_exception(own_copy(error))

    def worker_up(self) -> None:
        self.down = False

    # --- the loop -----------------------------------------------------------

    def _drop_dead_rows(self) -> None:
        now = asyncio.get_running_loop().time()
        dead = []
        for row in self._queue:
            if row.future.done():
                self.stats.sequences_cancelled += 1
                dead.append(row)
            elif row.deadline is not None and now >= row.deadline:
                self.stats.sequences_cancelled += 1
                dead.append(row)
                row.future.set_exception(
                    DeadlineExpired("the deadline passed while the request waited for the "
                                    "device") if row.adapter is None or row.entry is not None
                    else AdapterSlotsBusy(
                        f"all {self.slots.num_slots} adapter slots were in use by queued or "
                        "running requests with other adapters until the deadline; retry, "
                        "or start workers with more --max-adapters."))
            elif row.adapter is not None and row.entry is None:
                self._claim(row)  # a slot may have come free
        if dead:
            self._remove(dead)

    def _remove(self, rows: list[QueuedRow]) -> None:
        """Takes queued rows out for good (dropped or failed)."""
        self._queue.remove(rows, served=False)
        for row in rows:
            self._release(row)

    def _release(self, row: QueuedRow) -> None:
        """A row is done (answered, failed or dropped): its tenant's share
        and its adapter's slot are free of it."""
        self._tenant_rows[row.tenant] -= 1
        if not self._tenant_rows[row.tenant]:
            del self._tenant_rows[row.tenant]
        if row.entry is not None:
            self._unpin(row.entry)

    async def _run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._schedule()
            except Exception:  # a bug here must not leave every queued row waiting forever
                log.exception("%s: the scheduler failed; failing its queued rows",
                              self.worker_id)
                self._fail_rows(list(self._queue),
                                WorkerUnavailable(f"{self.worker_id}'s scheduler failed"))

    async def _schedule(self) -> None:
        """One round: drop what is dead, then grant a training turn or send a
        batch (after waiting for more rows where that pays)."""
        loop = asyncio.get_running_loop()
        self._drop_dead_rows()
        if self._in_flight >= MAX_IN_FLIGHT:
            return  # a batch coming back wakes the loop
        if self._grant_training_turn():
            self._wake.set()  # a forward batch may go beside the step
            return
        started, in_flight = loop.time(), self._in_flight
        while (remaining := self.policy.wait_left(
                self._ready(), self._timeline.busy_until(), self._in_flight, started,
                loop.time(), self._running_rows)) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       None if math.isinf(remaining) else remaining)
            except asyncio.TimeoutError:
                break
            self._wake.clear()
            self._drop_dead_rows()
            if self._in_flight != in_flight:  # a batch came back: decide afresh
                self._wake.set()
                return
        batch = self.policy.take(self._queue.in_fair_order(lambda row: row.ready))
        if batch and not self.down:
            self._dispatch(batch)
        if self._ready() or self._training:
            self._wake.set()

    def _ready(self) -> list[QueuedRow]:
        """Queued rows whose adapter (if any) is written."""
        return [r for r in self._queue if r.ready]

    def _dispatch(self, rows: list[QueuedRow]) -> None:
        batch = self.policy.pack(rows)  # first: nothing changes if it fails
        estimate = self.policy.estimate(batch)
        self._queue.remove(rows, served=True)
        self._running_rows += len(rows)
        self._batches_since_step += 1
        alone = self._in_flight == 0
        self._in_flight += 1
        flight = self._expect(self.policy.last_batch_seconds if estimate is None else estimate)
        self._in_background(self._run(rows, batch, flight, alone))

    async def _run(self, rows: list[QueuedRow], batch: Batch, flight: int,
                   alone: bool) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            result = await self.executor.run_batch(batch)
            for row, tensors in zip(rows, result.tensors, strict=True):
                if not row.future.done():
                    row.future.set_result(tensors)
            ended = loop.time()
            self.policy.ran(batch, result, ended - sent, ended, alone)
            self._count(rows, batch)
        except BaseException as error:  # the batch's rows learn why; the loop goes on
            failure = (error if isinstance(error, Exception)
                       else WorkerUnavailable(f"{self.worker_id}: the batch was abandoned"))
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(own_copy(failure))
            if not isinstance(error, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._timeline.ended(flight)
            self._running_rows -= len(rows)
            for row in rows:
                self._release(row)
            self._wake.set()

    def _count(self, rows: list[QueuedRow], batch: Batch) -> None:
        stats = self.stats
        stats.batches_run += 1
        stats.sequences_run += len(rows)
        stats.max_sequences_in_a_batch = max(stats.max_sequences_in_a_batch, len(rows))
        stats.max_adapters_in_a_batch = max(stats.max_adapters_in_a_batch,
                                            len({int(s) for s in batch.slot_ids[:len(rows)]}))
        stats.batch_shapes.add(batch.shape)
        stats.batch_size_counts[len(rows)] += 1
