"""A fake worker for `WorkerScheduler` tests: it runs nothing, records every
call (batches with their shapes, slot ids and layer ids, slot writes,
fine-tune steps, in order, and how many calls were out at once), and can
be held (asyncio.Event gates) or made to fail.

Its forward's hidden states encode their input, so a test can tell that
every row got exactly its own tensors:

    hidden[k, b, t, 0] = token_ids[b, t] * 1000 + layer_ids[k] + 0.5 * slot_ids[b]
    hidden[k, b, t, 1] = the payload of the adapter the device holds in
                         slot_ids[b] when the batch runs (0: base model)

Payloads are ints in these tests, so channel 1 says which adapter's weights
a row really ran with.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Callable

import numpy as np

from coordinator.forward_work import AdapterRef, ForwardWork
from worker.batch import OUTPUT_DTYPES, Batch, BatchResult, pool, row_results
from worker.worker_config import BatchingConfig

# Small buckets so a few rows make every decision: at most 4 rows, 32 tokens
# (two rows of 16), two distinct layers per batch; nobody waits on purpose.
CONFIG = BatchingConfig(length_buckets=(4, 8, 16), batch_buckets=(1, 2, 4),
                        max_batch_tokens=32, max_wait_ms=0.0, layer_slots=2)


def make_work(sequences, layers=(0,), *, adapter: AdapterRef | None = None,
              pooling="none", dtype="float32", timeout_s=None,
              request_id="r") -> ForwardWork:
    return ForwardWork(request_id=request_id,
                       sequences=tuple(np.asarray(s, "int32") for s in sequences),
                       layers=tuple(layers), pooling=pooling, dtype=dtype,
                       timeout_s=timeout_s, adapter=adapter)


def adapter(name: str, payload: int) -> AdapterRef:
    return AdapterRef(key=f"tenant/{name}@1", payload=payload)


def expected_tensor(tokens, layer, *, slot=0, payload=0, pooling="none",
                    dtype="float32") -> np.ndarray:
    """What the fake returns for one sequence at one layer."""
    tokens = np.asarray(tokens, "float32")
    hidden = np.stack([tokens * 1000 + layer + 0.5 * slot,
                       np.full_like(tokens, payload)], axis=-1)
    return pool(hidden, pooling).astype(OUTPUT_DTYPES[dtype], copy=False)


def check_result(result, work: ForwardWork, *, slot=0, payload=0) -> None:
    """`result` (a ForwardResult) holds, for each of `work`'s sequences,
    its own tensors at each requested layer, in the order asked for."""
    assert len(result.tensors) == len(work.sequences)
    for sequence, per_layer in zip(work.sequences, result.tensors):
        assert len(per_layer) == len(work.layers)
        for layer, got in zip(work.layers, per_layer):
            want = expected_tensor(sequence, layer, slot=slot, payload=payload,
                                   pooling=work.pooling, dtype=work.dtype)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


async def settle(ticks: int = 50) -> None:
    """Lets every task that can run, run (no wall-clock time passes)."""
    for _ in range(ticks):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], ticks: int = 2000) -> None:
    """Yields to the loop until `predicate()` holds; fails if it never does."""
    for _ in range(ticks):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class FakeExecutor:
    """Records every call a `WorkerScheduler` makes of its worker.

    Attributes:
        log: every call in order: ("batch", n) as batch n is received,
            ("batch done", n) as it returns; ("write", slot, payload),
            ("written", slot, payload); ("step", job_id), ("step done",
            job_id); ("start", job_id), ("finish", job_id), ("drop", job_id).
        batches: every Batch received, in order.
        writes: every (slot, payload) write asked for, in order.
        table: slot -> the payload the device holds there (set when a write ends).
        running, max_running: batches and steps out now, and the most at once.
        overlaps: calls that began while a call of the other kind (batch or
            step) was out.
        violations: what a real device would have computed wrong: a batch
            reading a slot whose write had not ended, a write to a slot a
            running batch reads.
        batch_gate / write_gates / step_gate: while set to an Event that is
            not set, those calls wait for it.
        batch_errors: exceptions the next batches raise (one each).
        rejected: payload -> exception its write raises.
        cost: batch -> the device seconds the batch reports (nothing sleeps).
        batch_ticks, step_ticks: loop turns a batch or step takes, ungated.
        during_batch: called with each batch as it is received.
        step_reports: what fine_tune_step returns in turn (then None).
        adapter_out: what finish_fine_tune returns.
    """

    def __init__(self, cost: Callable[[Batch], float] | None = None):
        self.log: list[tuple] = []
        self.batches: list[Batch] = []
        self.writes: list[tuple[int, Any]] = []
        self.table: dict[int, Any] = {}
        self.running = 0
        self.max_running = 0
        self.batches_running = 0
        self.max_batches_running = 0
        self.steps_running = 0
        self.overlaps = 0
        self.violations: list[str] = []
        self.batch_gate: asyncio.Event | None = None
        self.write_gates: dict[Any, asyncio.Event] = {}
        self.step_gate: asyncio.Event | None = None
        self.batch_errors: collections.deque[BaseException] = collections.deque()
        self.rejected: dict[Any, BaseException] = {}
        self.cost = cost
        self.batch_ticks = 1
        self.step_ticks = 1
        self.during_batch: Callable[[Batch], None] | None = None
        self.step_reports: collections.deque = collections.deque()
        self.adapter_out: Any = object()
        self.fine_tune_calls: list[tuple[str, str]] = []
        self._slots_read: collections.Counter[int] = collections.Counter()
        self._writing: set[int] = set()

    # --- what the scheduler calls ----------------------------------------

    def _began(self) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)

    async def run_batch(self, batch: Batch) -> BatchResult:
        n = len(self.batches)
        self.batches.append(batch)
        self.log.append(("batch", n))
        self._began()
        self.overlaps += self.steps_running > 0
        self.batches_running += 1
        self.max_batches_running = max(self.max_batches_running, self.batches_running)
        real_slots = {int(s) for s in batch.slot_ids[:len(batch.rows)]} - {0}
        for slot in real_slots:
            if slot in self._writing or slot not in self.table:
                self.violations.append(f"batch {n} read slot {slot} before its write ended")
        self._slots_read.update(real_slots)
        try:
            if self.during_batch is not None:
                self.during_batch(batch)
            if self.batch_gate is not None:
                await self.batch_gate.wait()
            else:
                await settle(self.batch_ticks)
            if self.batch_errors:
                raise self.batch_errors.popleft()
            return BatchResult(row_results(self.hidden(batch), batch.rows),
                               device_seconds=self.cost(batch) if self.cost else 0.0)
        finally:
            self._slots_read.subtract(real_slots)
            self.running -= 1
            self.batches_running -= 1
            self.log.append(("batch done", n))

    def hidden(self, batch: Batch) -> np.ndarray:
        """(K, B, T, 2) as the module docstring says."""
        tokens = batch.token_ids.astype("float32")
        layers = batch.layer_ids.astype("float32")[:, None, None]
        slots = batch.slot_ids.astype("float32")[None, :, None]
        value = tokens[None] * 1000 + layers + 0.5 * slots
        payloads = np.array([float(self.table.get(int(s), 0)) if s else 0.0
                             for s in batch.slot_ids], "float32")
        code = np.broadcast_to(payloads[None, :, None], value.shape)
        return np.stack([value, code], axis=-1)

    async def write_slot(self, slot: int, payload: Any) -> None:
        self.writes.append((slot, payload))
        self.log.append(("write", slot, payload))
        if self._slots_read[slot] > 0:
            self.violations.append(f"slot {slot} rewritten with {payload} under a running batch")
        self._writing.add(slot)
        self.table.pop(slot, None)  # half-written from here on
        try:
            gate = self.write_gates.get(payload)
            if gate is not None:
                await gate.wait()
            else:
                await asyncio.sleep(0)
            if payload in self.rejected:
                raise self.rejected[payload]
            self.table[slot] = payload
            self.log.append(("written", slot, payload))
        finally:
            self._writing.discard(slot)

    async def start_fine_tune(self, work) -> None:
        self.fine_tune_calls.append(("start", work.job_id))
        self.log.append(("start", work.job_id))

    async def fine_tune_step(self, job_id: str):
        self.fine_tune_calls.append(("step", job_id))
        self.log.append(("step", job_id))
        self._began()
        self.overlaps += self.batches_running > 0
        self.steps_running += 1
        try:
            if self.step_gate is not None:
                await self.step_gate.wait()
            else:
                await settle(self.step_ticks)
            return self.step_reports.popleft() if self.step_reports else None
        finally:
            self.running -= 1
            self.steps_running -= 1
            self.log.append(("step done", job_id))

    async def finish_fine_tune(self, job_id: str):
        self.fine_tune_calls.append(("finish", job_id))
        self.log.append(("finish", job_id))
        return self.adapter_out

    async def drop_fine_tune(self, job_id: str) -> None:
        self.fine_tune_calls.append(("drop", job_id))
        self.log.append(("drop", job_id))

    # --- what tests read ---------------------------------------------------

    def real_rows(self) -> list[int]:
        """Real (unpadded) rows of each batch, in order."""
        return [len(b.rows) for b in self.batches]

    def tokens_sent(self) -> list[int]:
        """Every real token id sent in any batch."""
        return [int(t) for b in self.batches for i, row in enumerate(b.rows)
                for t in b.token_ids[i, :row.length]]

    def first_tokens(self, n: int) -> list[int]:
        """The first token of each real row of batch n."""
        b = self.batches[n]
        return [int(b.token_ids[i, 0]) for i in range(len(b.rows))]

    def hold_batches(self) -> asyncio.Event:
        self.batch_gate = asyncio.Event()
        return self.batch_gate

    def hold_write(self, payload) -> asyncio.Event:
        gate = self.write_gates[payload] = asyncio.Event()
        return gate
