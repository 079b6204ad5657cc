"""The batcher alone, with a numpy model whose output encodes its input."""

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest

from worker.batch_timings import BatchTimings
from worker.dynamic_batcher import DynamicBatcher
from worker.errors import DeadlineExpired
from worker.worker_config import BatchingConfig

CONFIG = BatchingConfig(length_buckets=(4, 8, 16), batch_buckets=(1, 2, 4),
                        max_batch_tokens=32, max_wait_ms=5.0, layer_slots=2)


class EncodingModel:
    """hidden[k, b, t, 0] = 10000 * slot + 1000 * layer + token id; records
    batch shapes and the slots of each batch."""

    def __init__(self, delay=0.0):
        self.shapes, self.slots, self.delay = [], [], delay

    def __call__(self, token_ids, padding_mask, layer_ids, slot_ids):
        time.sleep(self.delay)
        self.shapes.append((token_ids.shape, len(set(layer_ids.tolist()))))
        self.slots.append(set(slot_ids[padding_mask.any(axis=1)].tolist()))
        assert ((token_ids != 0) <= (padding_mask == 1)).all()
        return (10000 * slot_ids[None, :, None, None] + 1000 * layer_ids[:, None, None, None]
                + token_ids[None, :, :, None]).astype("f4")


def run(coroutine_fn, model):
    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(CONFIG, model, executor)
            return await coroutine_fn(batcher), batcher
    return asyncio.run(main())


def check(result, sequences, layers, slot=0):
    for ids, per_layer in zip(sequences, result):
        assert sorted(per_layer) == sorted(layers)
        for layer in layers:
            np.testing.assert_array_equal(per_layer[layer][:, 0],
                                          10000 * slot + 1000 * layer + np.asarray(ids))


def test_rows_of_different_adapter_slots_share_a_batch_and_keep_their_slot():
    model = EncodingModel(delay=0.02)

    async def go(batcher):
        requests = [([[1, 2, 3]], slot) for slot in (0, 3, 1, 3, 2)]
        results = await asyncio.gather(*(batcher.submit(seqs, (0,), None, slot=slot)
                                         for seqs, slot in requests))
        for (seqs, slot), result in zip(requests, results):
            check(result, seqs, (0,), slot)
    run(go, model)
    assert max(len(slots) for slots in model.slots) > 1  # mixed in one batch


def test_concurrent_requests_share_batches_and_get_their_rows():
    model = EncodingModel(delay=0.02)
    rng = np.random.default_rng(0)
    requests = [([rng.integers(1, 99, rng.integers(1, 9)).tolist()
                  for _ in range(rng.integers(1, 3))], (int(rng.integers(0, 2)),))
                for _ in range(12)]

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(seqs, layers, None)
                                      for seqs, layers in requests))

    results, batcher = run(go, model)
    for (seqs, layers), result in zip(requests, results):
        check(result, seqs, layers)
    rows = sum(len(seqs) for seqs, _ in requests)
    assert batcher.stats.sequences_run == rows
    assert batcher.stats.batches_run < rows          # batching happened
    assert batcher.stats.max_sequences_in_a_batch > 1
    for (batch, length), _ in model.shapes:          # only bucket shapes, within budget
        assert batch in CONFIG.batch_buckets and length in CONFIG.length_buckets
        assert batch * length <= CONFIG.max_batch_tokens


def test_layer_slots_split_batches():
    model = EncodingModel()

    async def go(batcher):
        return await asyncio.gather(batcher.submit([[5]], (0,), None),
                                    batcher.submit([[6]], (1,), None),
                                    batcher.submit([[7]], (2,), None))

    results, _ = run(go, model)
    for ids, layer, result in zip((5, 6, 7), (0, 1, 2), results):
        check(result, [[ids]], (layer,))
    assert all(distinct <= CONFIG.layer_slots for _, distinct in model.shapes)


def test_cancelled_and_expired_rows_never_run():
    model = EncodingModel(delay=0.2)

    async def go(batcher):
        blocker = asyncio.ensure_future(batcher.submit([[1] * 16] * 2, (0,), None))
        await asyncio.sleep(0.05)  # the blocker is on the device now
        cancelled = asyncio.ensure_future(batcher.submit([[2], [3]], (0,), None))
        expired = asyncio.ensure_future(batcher.submit([[4]], (0,), time.time() + 0.05))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(DeadlineExpired):
            await expired
        await blocker
        after = await batcher.submit([[9]], (1,), None)
        return after

    after, batcher = run(go, model)
    check(after, [[9]], (1,))
    assert batcher.stats.sequences_run == 3           # the blocker's two rows, then [9]
    assert batcher.stats.sequences_cancelled == 3     # [2], [3] cancelled; [4] expired


def test_rows_that_could_never_run_are_refused_not_queued():
    async def go(batcher):
        with pytest.raises(ValueError, match="a sequence of 17 tokens"):
            await batcher.submit([[1] * 17], (0,), None)
        with pytest.raises(ValueError, match="3 layers requested"):
            await batcher.submit([[1]], (0, 1, 2), None)
        return await batcher.submit([[3]], (0,), None)  # the loop still serves

    result, _ = run(go, EncodingModel())
    check(result, [[3]], (0,))
    with pytest.raises(ValueError, match="must hold the smallest batch"):
        BatchingConfig(length_buckets=(32,), batch_buckets=(2, 4), max_batch_tokens=32)


def test_a_failing_batch_fails_its_rows_and_the_loop_goes_on():
    calls = []

    def flaky(token_ids, padding_mask, layer_ids, slot_ids):
        calls.append(token_ids.shape)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return EncodingModel()(token_ids, padding_mask, layer_ids, slot_ids)

    async def go(batcher):
        with pytest.raises(RuntimeError, match="device fell over"):
            await batcher.submit([[1]], (0,), None)
        return await batcher.submit([[4]], (1,), None)

    result, _ = run(go, flaky)
    check(result, [[4]], (1,))


class CostModel(EncodingModel):
    """An EncodingModel whose batch takes `cost(rows bucket)` seconds, and
    which records each batch's real rows."""

    def __init__(self, cost):
        super().__init__()
        self.cost, self.real_rows = cost, []
        self.during = None  # called as each batch starts (on the executor's thread)

    def __call__(self, token_ids, padding_mask, layer_ids, slot_ids):
        if self.during is not None:
            self.during()
        time.sleep(self.cost(len(token_ids)))
        self.real_rows.append(int(padding_mask.any(axis=1).sum()))
        return super().__call__(token_ids, padding_mask, layer_ids, slot_ids)


LINEAR = 0.15   # a CPU: each padded row costs the same
FLAT = 0.5      # a GPU at small batches: a batch costs the same whatever its rows


async def time_every_bucket(batcher, model):
    """Two batches of each bucket (a shape's first is not timed: it would
    include a compilation); the last has 4 rows."""
    for rows in (1, 1, 2, 2, 4, 4):
        await batcher.submit([[7]] * rows, (0,), None)
    model.real_rows.clear()


@pytest.mark.parametrize("cost, expected", [(lambda bucket: LINEAR * bucket, [2, 1]),
                                            (lambda bucket: FLAT, [3])],
                         ids=["linear cost: trimmed to a full bucket", "flat cost: padded"])
def test_a_batch_is_trimmed_to_a_full_bucket_only_where_that_is_cheaper(cost, expected):
    """3 rows: a bucket of 4, or a full bucket of 2 (cheaper per row where
    cost grows with the rows) and then 1 row; the request's rows come back
    whole either way."""
    model = CostModel(cost)

    async def go(batcher):
        await time_every_bucket(batcher, model)
        result = await batcher.submit([[1], [2], [3]], (0,), None)
        check(result, [[1], [2], [3]], (0,))

    run(go, model)
    assert model.real_rows == expected


@pytest.mark.parametrize("cost, first, expected", [
    (lambda bucket: LINEAR * bucket, 2, [2, 2]),
    (lambda bucket: LINEAR * bucket, 3, [4]),
    (lambda bucket: FLAT, 2, [4])],
    ids=["linear cost, 2 + 2: two batches cost what one does, runs at once",
         "linear cost, 3 + 1: 3 rows pad to 4 anyway, waits a little",
         "flat cost, 2 + 2: a second batch costs a whole one, waits"])
def test_stragglers_are_waited_for_only_as_long_as_it_can_pay(cost, first, expected):
    """After a batch of 4, `first` rows arrive and the rest 50 ms later.
    Waiting pays up to what a separate batch for the stragglers would cost
    the device (capped at a fifth of the last batch: 120 and 100 ms here)."""
    model = CostModel(cost)
    rows = [[1], [2], [3], [4]]

    async def go(batcher):
        await time_every_bucket(batcher, model)
        early = asyncio.ensure_future(batcher.submit(rows[:first], (0,), None))
        await asyncio.sleep(0.05)
        late = await batcher.submit(rows[first:], (0,), None)
        check(await early, rows[:first], (0,))
        check(late, rows[first:], (0,))

    run(go, model)
    assert model.real_rows == expected


def test_after_an_idle_spell_a_lone_request_does_not_wait_for_the_last_batchs_callers():
    """As the flat-cost case above, but the rows come 0.5 s after the batch
    of 4 ended, longer than its callers take to come back (0.2 s): nobody is
    on their way, so the first 2 run at once and the other 2 separately."""
    model = CostModel(lambda bucket: FLAT)

    async def go(batcher):
        await time_every_bucket(batcher, model)
        await asyncio.sleep(0.5)
        early = asyncio.ensure_future(batcher.submit([[1], [2]], (0,), None))
        await asyncio.sleep(0.05)
        await batcher.submit([[3], [4]], (0,), None)
        await early

    run(go, model)
    assert model.real_rows == [2, 2]


def test_rows_trimmed_off_do_not_jump_ahead_of_older_skipped_rows():
    """A row that cannot share a batch (its layers would exceed the slots)
    is skipped while older rows run. Here every batch finds 3 rows for layer
    0, runs 2 (a full bucket) and hands one back: were it put first in line,
    ahead of the older skipped row, that row would wait as long as the load
    lasts. Rows handed back keep their place by arrival."""
    model = CostModel(lambda bucket: 0.01 * bucket)

    async def go(batcher):
        await time_every_bucket(batcher, model)
        loop = asyncio.get_running_loop()
        load = [asyncio.ensure_future(batcher.submit([[5], [6], [7]], (0,), None))]
        odd = asyncio.ensure_future(batcher.submit([[9]], (1, 2), None))
        # Two more rows for layer 0 arrive while each batch runs.
        model.during = lambda: loop.call_soon_threadsafe(lambda: load.append(
            asyncio.ensure_future(batcher.submit([[5], [6]], (0,), None))))
        start = batcher.stats.batches_run
        while not odd.done() and batcher.stats.batches_run < start + 40:
            await asyncio.sleep(0.005)
        model.during = None
        waited = batcher.stats.batches_run - start
        check(await odd, [[9]], (1, 2))
        for request in load:
            await request
        return waited

    waited, _ = run(go, model)
    assert waited <= 3

def test_batch_timings_skip_compilation_take_a_median_and_say_how_old_they_are():
    now = [0.0]
    timings = BatchTimings(keep=3, clock=lambda: now[0])
    shape = (8, 128, False)
    timings.record(shape, 9.0)                 # the compiling run: left out
    assert timings.seconds(shape) is None
    for seconds in (0.02, 0.5, 0.03):          # one slow outlier
        timings.record(shape, seconds)
    assert timings.seconds(shape) == 0.03
    timings.record(shape, 0.04)                # keeps the last 3: 0.5, 0.03, 0.04
    assert timings.seconds(shape) == 0.04
    now[0] = 11.0                              # not run for a while
    assert timings.seconds(shape, max_age_s=10.0) is None
    assert timings.seconds(shape) == 0.04
    timings.record(shape, 0.05)
    assert timings.seconds(shape, max_age_s=10.0) == 0.04
