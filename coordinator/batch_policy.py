"""How one worker's scheduler forms batches: which rows go together, how
long to wait for more, and how they are padded; decided by the device
times measured per batch shape (the cost model).
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Iterable, Protocol

import numpy as np

from coordinator.batch_timings import BatchTimings
from coordinator.forward_work import ForwardWork
from worker.batch import Batch, BatchResult, BatchRow
from worker.score_picks import ScoreSpec
from worker.worker_config import BatchingConfig

# Never wait longer than this for stragglers, whatever the last batch took
# (a fifth of a real-size batch on a CPU is seconds; the measured saving
# bounds the wait further).
MAX_STRAGGLER_WAIT_S = 2.0
# The last batch's callers come back within a round trip of its end: a
# device idle longer than this since (or than a fifth of the last batch, if
# longer: answering a large batch's callers takes the service a while) has
# nobody on the way.
CALLERS_RETURN_WITHIN_S = 0.2
# A padded shape avoided (by trimming) this long is run whole again, so its
# time is measured afresh.
RETIME_AFTER_S = 30.0


class Row(Protocol):
    work: ForwardWork
    token_ids: np.ndarray
    tokens: int
    slot: int         # its adapter's slot; 0: the base model
    queued_at: float  # the loop time it arrived
    score: ScoreSpec | None  # a Score request's row: what it asks of the head


class BatchPolicy:
    """Batch formation and the measurements it is decided by.

    Args:
        config: buckets, token budget, least wait.
    """

    def __init__(self, config: BatchingConfig):
        self.config = config
        # (rows, length, any adapter, any row scoring every position) -> device seconds
        self.timings = BatchTimings()
        self._overheads: collections.deque[float] = collections.deque(maxlen=16)
        # (when it ended, its rows, its device seconds) of the batches
        # answered lately: their callers are expected back.
        self._answered: collections.deque[tuple[float, int, float]] = collections.deque(
            maxlen=64)
        self._arrivals: collections.deque[float] = collections.deque(maxlen=4096)  # row times
        self.last_batch_seconds = 0.0

    def take(self, rows_in_order: Iterable[Row]) -> list[Row]:
        """The next batch: rows in the order given, skipping those that
        would break the token budget or the layer slots, then trimmed to a
        cheaper bucket where that pays."""
        cfg, batch, layers, longest = self.config, [], set(), 0
        for row in rows_in_order:
            new_layers = layers | set(row.work.layers)
            new_longest = max(longest, row.tokens)
            if len(new_layers) <= cfg.layer_slots and cfg.fits(len(batch) + 1, new_longest):
                batch.append(row)
                layers, longest = new_layers, new_longest
                if len(batch) == cfg.batch_buckets[-1]:
                    break
        return self._trim_to_a_cheaper_bucket(batch)

    def _seconds(self, rows: int, length: int, kind: tuple[bool, bool],
                 max_age_s: float | None = None) -> float | None:
        cfg = self.config
        return self.timings.seconds((cfg.batch_bucket(rows), cfg.length_bucket(length), *kind),
                                    max_age_s)

    @staticmethod
    def _kind(rows) -> tuple[bool, bool]:
        """What else than its shape sets a batch's cost: whether a row reads
        an adapter, and whether a row asks the head at every position
        (Score's token log-probabilities: up to 1.4x a forward at real
        size, benchmarks/score_cost.py)."""
        return (any(r.slot for r in rows),
                any(r.score is not None and r.score.token_logprobs for r in rows))

    def _trim_to_a_cheaper_bucket(self, batch: list[Row]) -> list[Row]:
        """Where a batch's cost grows with its rows (a CPU), padding 10 rows
        to a bucket of 16 wastes 6 rows of work: run the next smaller bucket
        full when that costs the device less per row; the rest stay queued
        for the next batch. Where cost hardly grows (a GPU), padding is
        nearly free and the batch runs whole. A padded shape not timed for a
        while runs whole, so one that looked dear once is measured again,
        not avoided for good."""
        cfg, rows = self.config, len(batch)
        smaller = [b for b in cfg.batch_buckets if b < rows]
        if not smaller or cfg.batch_bucket(rows) == rows:
            return batch
        full = smaller[-1]
        length = max(r.tokens for r in batch)
        kind = self._kind(batch)
        whole = self._seconds(rows, length, kind, RETIME_AFTER_S)
        part = self._seconds(full, length, kind)
        if whole is None or part is None or part / full >= whole / rows:
            return batch
        return batch[:full]

    def straggler_wait_s(self) -> float:
        """The most a batch waits for the last batch's callers to return.
        Waiting a fifth of a batch's run time to fill it costs at most 20%;
        splitting one batch in two costs a whole extra batch."""
        return max(self.config.max_wait_ms / 1000,
                   min(0.2 * self.last_batch_seconds, MAX_STRAGGLER_WAIT_S))

    def _wait_that_can_pay(self, ready: list[Row], expected: int, wait_s: float) -> float:
        """How long waiting for the expected stragglers can pay, at most
        `wait_s`: what running the ready rows now and the stragglers in a
        batch of their own costs the device over one batch of all of them
        (most of a batch on a GPU, little on a CPU)."""
        length = max(r.tokens for r in ready)
        kind = self._kind(ready)
        stragglers = expected - len(ready)
        now, later, together = (self._seconds(n, length, kind)
                                for n in (len(ready), stragglers, len(ready) + stragglers))
        if now is None or later is None or together is None:
            return wait_s
        return min(wait_s, max(0.0, now + later - together))

    def _merge_pays(self, ready: list[Row], rows_in_flight: int) -> bool:
        """Whether the ready rows, run with the callers of the rows in
        flight once they are back, save the device more than the round
        trip it idles for them (unknown timings: no)."""
        together = len(ready) + rows_in_flight
        length = max(r.tokens for r in ready)
        if not rows_in_flight or not self.config.fits(together, length):
            return False
        kind = self._kind(ready)
        now, later, merged = (self._seconds(n, length, kind)
                              for n in (len(ready), rows_in_flight, together))
        if now is None or later is None or merged is None:
            return False
        return now + later - merged > self.overhead_s()

    def overhead_s(self) -> float:
        """The time a batch spends outside the device (the call there and
        back), median of the recent ones."""
        return statistics.median(self._overheads) if self._overheads else 0.0

    def wait_left(self, ready: list[Row], busy_until: float | None, in_flight: int,
                  started: float, now: float, rows_in_flight: int = 0) -> float:
        """How much longer to hold the `ready` rows before sending a batch.

        Args:
            busy_until: when the device should be done with what is in
                flight (None: unknown).
            in_flight: batches or steps sent and not answered.
            started: when this wait began.
            now: the loop's time.
            rows_in_flight: rows of the batches in flight (their callers
                are expected back once they are answered).
        """
        cfg = self.config
        if not ready or len(ready) >= cfg.batch_buckets[-1] or not cfg.fits(
                len(ready) + 1, max(r.tokens for r in ready)):
            return 0.0  # full (or nothing to wait for)
        if in_flight:
            if self._merge_pays(ready, rows_in_flight):
                # Few rows now, many on the device whose callers come back
                # when it ends: one batch of all of them after it costs the
                # device less than a small batch now, more than the round
                # trip the device then idles. Held until that batch is back
                # (however late: it wakes the scheduler).
                return math.inf
            # Else send the next batch so that it arrives as the last one
            # ends, with whatever has queued by then.
            return 0.0 if busy_until is None else busy_until - self.overhead_s() - now
        # The callers of the batches answered lately are on their way back;
        # after an idle spell nobody is, and a lone request runs at once.
        # No more than one batch can take: beyond that they are the next one's.
        expected = min(self._expected_back(now, ready), cfg.batch_buckets[-1])
        if len(ready) >= expected:
            return 0.0
        return started + self._wait_that_can_pay(ready, expected, self.straggler_wait_s()) - now

    def arrived(self, now: float, rows: int) -> None:
        """Rows that just arrived (the callers coming back are among them)."""
        self._arrivals.extend([now] * rows)

    def _expected_back(self, now: float, ready: list[Row]) -> int:
        """How many rows to wait for: the ready ones, and the callers of the
        batches answered lately that have not come back yet (a batch's
        callers come back within a round trip of its end, or a fifth of its
        time if longer, since answering a large batch's callers takes the
        service a while): the rows those batches answered less the rows that
        arrived since the first of them ended. Every such batch counts, not
        the last one alone: with two in flight, a lone row answered just
        after fifteen would otherwise set the target at one and split the
        next batch again; and a caller that came back and was sent counts as
        back, so one client's sequential requests never wait for themselves."""
        recent = [(ended, rows) for ended, rows, seconds in self._answered
                  if now - ended <= max(CALLERS_RETURN_WITHIN_S,
                                        min(0.2 * seconds, MAX_STRAGGLER_WAIT_S))]
        if not recent:
            return 0
        first_end = min(ended for ended, _ in recent)
        back = 0
        for t in reversed(self._arrivals):  # newest first: only the recent ones count
            if t < first_end:
                break
            back += 1
        return len(ready) + max(0, sum(rows for _, rows in recent) - back)

    def pack(self, batch: list[Row]) -> Batch:
        """The rows padded to their (rows, length) bucket."""
        cfg = self.config
        rows, length = cfg.batch_bucket(len(batch)), cfg.length_bucket(
            max(r.tokens for r in batch))
        token_ids = np.zeros((rows, length), "int32")
        padding_mask = np.zeros((rows, length), "int32")
        slot_ids = np.zeros((rows,), "int32")
        for i, row in enumerate(batch):
            token_ids[i, : row.tokens] = row.token_ids
            padding_mask[i, : row.tokens] = 1
            slot_ids[i] = row.slot
        layers = sorted({layer for row in batch for layer in row.work.layers})
        position = {layer: k for k, layer in enumerate(layers)}
        # Unused layer slots repeat a layer: the shape stays fixed, the work is tiny.
        layer_ids = np.array(layers + [layers[0]] * (cfg.layer_slots - len(layers)), "int32")
        specs = tuple(BatchRow(length=row.tokens,
                               layers=tuple(position[layer] for layer in row.work.layers),
                               pooling=row.work.pooling, dtype=row.work.dtype,
                               dimensions=row.work.dimensions,
                               normalize=row.work.normalize, score=row.score)
                      for row in batch)
        return Batch(token_ids, padding_mask, layer_ids, slot_ids, specs)

    @staticmethod
    def shape_key(batch: Batch) -> tuple:
        """What the cost model times a batch by: its shape and `_kind`."""
        return (*batch.shape, bool(batch.slot_ids.any()),
                any(row.score is not None and row.score.token_logprobs for row in batch.rows))

    def estimate(self, batch: Batch) -> float | None:
        return self.timings.seconds(self.shape_key(batch))

    def ran(self, batch: Batch, result: BatchResult, call_seconds: float,
            ended: float, alone: bool) -> None:
        """Records a batch that came back after `call_seconds`. The round
        trip (what sending ahead has to cover) is what the call took beyond
        the device, measured on batches sent `alone`: one sent behind
        another also waited for that one's device time."""
        self.timings.record(self.shape_key(batch), result.device_seconds)
        if alone:
            self._overheads.append(max(0.0, call_seconds - result.device_seconds))
        self.last_batch_seconds = result.device_seconds
        self._answered.append((ended, len(batch.rows), result.device_seconds))
