"""Groups concurrent requests' sequences into padded, bucketed batches.

Pure asyncio and numpy: the model is a blocking callable run on one
executor thread, so the event loop keeps accepting work while the device
computes, and whatever queued meanwhile forms the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import time
from typing import Callable, Sequence

import numpy as np

from worker.batch_timings import BatchTimings
from worker.errors import DeadlineExpired
from worker.worker_config import BatchingConfig

# A first call of a shape includes its compilation: never wait longer than
# this for stragglers, whatever the last batch took.
_MAX_STRAGGLER_WAIT_S = 0.2
# The last batch's callers come back within a round trip of its end (a few
# ms); a device idle longer than this since has nobody on the way.
_CALLERS_RETURN_WITHIN_S = 0.2
# A padded shape the batcher has avoided (by trimming) this long is run
# whole again, so its time is measured afresh.
_RETIME_AFTER_S = 30.0

# run(token_ids (B, T), padding_mask (B, T), layer_ids (K,), slot_ids (B,)) -> (K, B, T, d)
RunBatch = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class _Row:
    token_ids: np.ndarray
    layers: tuple[int, ...]
    deadline: float | None
    future: asyncio.Future
    slot: int = 0  # adapter slot; 0 is the base model
    arrival: int = 0  # order of arrival: rows handed back keep their place


@dataclasses.dataclass
class BatcherStats:
    batches_run: int = 0
    sequences_run: int = 0
    max_sequences_in_a_batch: int = 0
    sequences_cancelled: int = 0
    running: int = 0
    max_adapters_in_a_batch: int = 0
    batch_shapes: set = dataclasses.field(default_factory=set)
    batch_size_counts: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)  # rows in a batch -> batches


class DynamicBatcher:
    """Batches rows of any requests; each request gets exactly its rows back.

    Args:
        config: bucket and budget limits.
        run_batch: the blocking model call.
        executor: where `run_batch` runs (one thread: one device mesh).
    """

    def __init__(self, config: BatchingConfig, run_batch: RunBatch,
                 executor: concurrent.futures.Executor):
        self._config = config
        self._run_batch = run_batch
        self._executor = executor
        self._pending: collections.deque[_Row] = collections.deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._last_batch_rows = 1
        self._last_batch_seconds = 0.0
        self._last_batch_ended = float("-inf")  # loop time
        # (rows bucket, length bucket, any adapter row) -> device seconds:
        # the cost model behind trimming and waiting.
        self.timings = BatchTimings()
        self._arrivals = itertools.count()
        self.stats = BatcherStats()

    def start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())

    async def submit(self, sequences: Sequence[np.ndarray], layers: tuple[int, ...],
                     deadline: float | None, slot: int = 0) -> list[dict[int, np.ndarray]]:
        """Queues the sequences; returns, per sequence, {layer: (tokens, d)}.

        Rows of any adapter slots share batches. Cancelling the caller drops
        its rows that have not run yet.
        """
        self.start()
        if not 1 <= len(set(layers)) <= self._config.layer_slots:
            raise ValueError(f"{len(set(layers))} layers requested; a batch holds 1 to "
                             f"{self._config.layer_slots}.")
        for sequence in sequences:
            if not 1 <= len(sequence) <= self._config.max_sequence_length:
                raise ValueError(f"a sequence of {len(sequence)} tokens; this worker takes 1 "
                                 f"to {self._config.max_sequence_length}.")
        loop = asyncio.get_running_loop()
        rows = [_Row(np.asarray(s, "int32"), layers, deadline, loop.create_future(), slot,
                     next(self._arrivals)) for s in sequences]
        self._pending.extend(rows)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(row.future for row in rows)))
        except BaseException:
            for row in rows:
                row.future.cancel()  # no-op for rows already done
            self._wake.set()  # so the loop drops them now, not at the next arrival
            raise

    def _drop_dead_rows(self) -> None:
        now = time.time()
        alive = collections.deque()
        for row in self._pending:
            if row.future.done():
                self.stats.sequences_cancelled += 1
            elif row.deadline is not None and now >= row.deadline:
                self.stats.sequences_cancelled += 1
                row.future.set_exception(DeadlineExpired(
                    "the deadline passed while the request waited for the device"))
            else:
                alive.append(row)
        self._pending = alive

    def _take_batch(self) -> list[_Row]:
        """FIFO, skipping rows that would break the budget or layer slots."""
        batch, layers, longest, kept = [], set(), 0, collections.deque()
        for row in self._pending:
            new_layers = layers | set(row.layers)
            new_longest = max(longest, len(row.token_ids))
            if (len(new_layers) <= self._config.layer_slots
                    and self._config.fits(len(batch) + 1, new_longest)):
                batch.append(row)
                layers, longest = new_layers, new_longest
            else:
                kept.append(row)
        self._pending = kept
        return batch

    def _seconds(self, rows: int, length: int, adapters: bool,
                 max_age_s: float | None = None) -> float | None:
        cfg = self._config
        return self.timings.seconds((cfg.batch_bucket(rows), cfg.length_bucket(length), adapters),
                                    max_age_s)

    def _trim_to_a_cheaper_bucket(self, batch: list[_Row]) -> list[_Row]:
        """Where a batch's cost grows with its rows (a CPU), padding 10 rows
        to a bucket of 16 wastes 6 rows of work: run the next smaller bucket
        full when that costs the device less per row, the rest back in line
        in their order of arrival (ahead of later rows). Per row, because
        under load the rest join the next batch, which runs anyway; a lone
        burst may pay for one small extra batch. Where cost hardly grows (a
        GPU), padding is nearly free and the batch runs whole. The measured
        times decide; a padded shape not timed for a while runs whole, so
        one that looked dear once is measured again, not avoided for good."""
        cfg, rows = self._config, len(batch)
        smaller = [b for b in cfg.batch_buckets if b < rows]
        if not smaller or cfg.batch_bucket(rows) == rows:
            return batch
        full = smaller[-1]
        length = max(len(r.token_ids) for r in batch)
        adapters = any(r.slot for r in batch)
        whole = self._seconds(rows, length, adapters, _RETIME_AFTER_S)
        part = self._seconds(full, length, adapters)
        if whole is None or part is None or part / full >= whole / rows:
            return batch
        self._pending = collections.deque(heapq.merge(
            batch[full:], self._pending, key=lambda row: row.arrival))
        return batch[:full]

    def _batch_is_full(self) -> bool:
        rows = len(self._pending)
        return rows >= self._config.batch_buckets[-1] or not self._config.fits(
            rows + 1, max(len(r.token_ids) for r in self._pending))

    def _ready_to_run(self) -> bool:
        # As many rows as the last batch had means the callers of that batch
        # are back: waiting longer only adds latency. Fewer means some are
        # probably on their way, and `_wait_that_can_pay` says how long to
        # wait for them.
        return len(self._pending) >= self._last_batch_rows or self._batch_is_full()

    def _wait_that_can_pay(self, wait_s: float) -> float:
        """How long waiting for the expected stragglers can pay, at most
        `wait_s`: what running the pending rows now and the stragglers in a
        batch of their own costs the device over one batch of all of them.
        That is most of a batch where a batch costs about the same whatever
        its rows (a GPU), little or nothing where the cost grows with the
        rows (a CPU); waiting longer than the saving loses even if they come.
        Shapes not timed yet: `wait_s`."""
        pending = len(self._pending)
        length = max(len(r.token_ids) for r in self._pending)
        adapters = any(r.slot for r in self._pending)
        stragglers = self._last_batch_rows - pending
        now, later, together = (self._seconds(n, length, adapters)
                                for n in (pending, stragglers, pending + stragglers))
        if now is None or later is None or together is None:
            return wait_s
        return min(wait_s, max(0.0, now + later - together))

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drop_dead_rows()
            if not self._pending:
                continue
            # Waiting a fifth of a batch's run time to fill it costs at most
            # 20%; splitting one batch in two costs a whole extra batch for the
            # stragglers and pads both. A tenth was too short on a shared
            # 2-core host: 16 callers' round trip took longer than it.
            wait_s = max(self._config.max_wait_ms / 1000,
                         min(0.2 * self._last_batch_seconds, _MAX_STRAGGLER_WAIT_S))
            started = loop.time()
            # After an idle spell a lone request runs at once instead of
            # waiting for the last batch's callers, who are long gone.
            callers_may_return = started - self._last_batch_ended <= _CALLERS_RETURN_WITHIN_S
            while callers_may_return and not self._ready_to_run():
                remaining = started + self._wait_that_can_pay(wait_s) - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                self._wake.clear()
            self._drop_dead_rows()
            batch = self._trim_to_a_cheaper_bucket(self._take_batch())
            if self._pending:
                self._wake.set()
            if batch:
                self._last_batch_rows = len(batch)
                await self._run(batch)
                self._last_batch_ended = loop.time()

    def _pack(self, batch: list[_Row]):
        cfg = self._config
        rows, length = cfg.batch_bucket(len(batch)), cfg.length_bucket(
            max(len(r.token_ids) for r in batch))
        token_ids = np.zeros((rows, length), "int32")
        padding_mask = np.zeros((rows, length), "int32")
        slot_ids = np.zeros((rows,), "int32")
        for i, row in enumerate(batch):
            token_ids[i, : len(row.token_ids)] = row.token_ids
            padding_mask[i, : len(row.token_ids)] = 1
            slot_ids[i] = row.slot
        layers = sorted({layer for row in batch for layer in row.layers})
        slot_of = {layer: k for k, layer in enumerate(layers)}
        # Unused slots repeat a layer: the shape stays fixed, the work is tiny.
        layer_ids = np.array(layers + [layers[0]] * (cfg.layer_slots - len(layers)), "int32")
        return token_ids, padding_mask, layer_ids, slot_ids, slot_of

    def _timed_run_batch(self, *args):
        """`run_batch` and the seconds it took, on the executor's thread: not
        the time a batch queued there behind other work (fine-tune steps)."""
        started = time.monotonic()
        return self._run_batch(*args), time.monotonic() - started

    async def _run(self, batch: list[_Row]) -> None:
        self.stats.running = len(batch)
        try:
            token_ids, padding_mask, layer_ids, slot_ids, slot_of = self._pack(batch)
            hidden, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._timed_run_batch, token_ids, padding_mask, layer_ids,
                slot_ids)
            results = [{layer: hidden[slot_of[layer], i, : len(row.token_ids)]
                        for layer in row.layers} for i, row in enumerate(batch)]
        except Exception as error:  # This batch failed: its rows learn why, the loop goes on.
            for row in batch:
                if not row.future.done():
                    row.future.set_exception(error)
            return
        finally:
            self.stats.running = 0
        self._last_batch_seconds = seconds
        self.timings.record((*token_ids.shape, bool(slot_ids.any())), seconds)
        self.stats.batches_run += 1
        self.stats.sequences_run += len(batch)
        self.stats.max_sequences_in_a_batch = max(self.stats.max_sequences_in_a_batch,
                                                  len(batch))
        self.stats.max_adapters_in_a_batch = max(self.stats.max_adapters_in_a_batch,
                                                 len({row.slot for row in batch}))
        self.stats.batch_shapes.add(token_ids.shape)
        self.stats.batch_size_counts[len(batch)] += 1
        for row, result in zip(batch, results):
            if not row.future.done():
                row.future.set_result(result)

    def in_flight(self) -> int:
        return len(self._pending) + self.stats.running
