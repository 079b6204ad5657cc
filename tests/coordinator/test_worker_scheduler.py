"""One worker's scheduler on a fake worker (tests/coordinator/scheduler_support.py):
which rows go together, in what shapes, in what order, how many batches are
out at once, and what happens to rows that are cancelled, expire or fail.
Every result is checked against the tensors its own sequences encode."""

import asyncio
import math
import types

import numpy as np
import pytest

from coordinator.batch_timings import BatchTimings
from coordinator.fine_tune_steps import train
from coordinator.worker_scheduler import MAX_IN_FLIGHT, WorkerScheduler
from scheduler_support import (CONFIG, FakeExecutor, adapter, check_result, make_work, settle,
                               until)
from worker.batch import BatchResult
from worker.errors import DeadlineExpired, FineTuneFailed, WorkerUnavailable
from worker.fine_tune_session import StepReport
from worker.worker_config import BatchingConfig

A = adapter("a", 11)


def run(main, timeout_s=5.0):
    """Runs `main()` on a fresh loop; a scheduler that stops answering fails
    the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(main(), timeout_s))


def new_scheduler(fake, config=CONFIG, num_slots=4):
    return WorkerScheduler("w0", fake, config, num_slots)


# ---- batch formation -----------------------------------------------------------------------


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows():
    rng = np.random.default_rng(0)
    layer_choices = [(0,), (1,), (0, 1), (1, 0)]
    works = [make_work([rng.integers(1, 99, rng.integers(1, 17)).tolist()
                        for _ in range(rng.integers(1, 4))],
                       layer_choices[rng.integers(0, 4)], request_id=f"r{i}")
             for i in range(12)]

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        results = await asyncio.gather(*(s.submit(w) for w in works))
        return fake, s, results

    fake, s, results = run(main)
    for work, result in zip(works, results):
        assert result.worker_id == "w0"
        check_result(result, work)
    rows = sum(len(w.sequences) for w in works)
    assert s.stats.forward_requests == 12
    assert s.stats.sequences_run == rows == sum(fake.real_rows())
    assert s.stats.batches_run == len(fake.batches) < rows       # batching happened
    assert s.stats.max_sequences_in_a_batch > 1
    for batch in fake.batches:
        real = batch.rows
        # Padded to exactly the buckets of its real rows, within the budget.
        assert batch.shape == (CONFIG.batch_bucket(len(real)),
                               CONFIG.length_bucket(max(r.length for r in real)))
        assert batch.shape[0] * batch.shape[1] <= CONFIG.max_batch_tokens
        assert len(set(batch.layer_ids.tolist())) <= CONFIG.layer_slots
        assert batch.layer_ids.shape == (CONFIG.layer_slots,)
        for i, row in enumerate(real):
            assert batch.padding_mask[i].tolist() == [1] * row.length + [0] * (
                batch.shape[1] - row.length)
            assert not batch.token_ids[i, row.length:].any()
        assert not batch.padding_mask[len(real):].any()
        assert not batch.token_ids[len(real):].any()
    assert s.stats.batch_shapes == {b.shape for b in fake.batches}
    assert s.in_flight() == 0


def test_poolings_and_dtypes_are_each_rows_own_in_a_shared_batch():
    combos = [(p, d) for p in ("none", "mean", "last_token")
              for d in ("float32", "bfloat16", "float16")]
    works = [make_work([[(i + 1) * k for k in (1, 2, 3)]], (i % 2,), pooling=p, dtype=d)
             for i, (p, d) in enumerate(combos)]

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        return fake, await asyncio.gather(*(s.submit(w) for w in works))

    fake, results = run(main)
    for work, result in zip(works, results):
        check_result(result, work)
        (tensor,) = result.tensors[0]
        assert tensor.shape == ((3, 2) if work.pooling == "none" else (2,))
    # Nine rows of three tokens: batches of the largest bucket, whatever they ask back.
    assert fake.real_rows() == [4, 4, 1]
    assert {r.pooling for r in fake.batches[0].rows} == {"none", "mean"}


def test_layer_slots_split_batches():
    """Two layer slots: rows for layers 0, 1 and 2 cannot all share a batch;
    each row gets its layers in the order it asked for them."""
    works = [make_work([[5]], (0,)), make_work([[6]], (1, 0)), make_work([[7]], (2,))]

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        return fake, await asyncio.gather(*(s.submit(w) for w in works))

    fake, results = run(main)
    for work, result in zip(works, results):
        check_result(result, work)
    assert fake.real_rows() == [2, 1]
    assert sorted(fake.batches[0].layer_ids.tolist()) == [0, 1]
    assert fake.batches[1].layer_ids.tolist() == [2, 2]      # an unused slot repeats a layer
    assert fake.batches[0].rows[1].layers == (1, 0)           # positions, in the asked order


def test_the_token_budget_and_buckets_decide_how_many_rows_a_batch_takes():
    """Budget 32 tokens: two rows of 16 (a third would pad to 4 x 16); short
    rows that come later are not held back by the long ones."""
    long_rows = [make_work([[k] * 16]) for k in range(1, 5)]
    short_rows = [make_work([[9]]), make_work([[8, 8, 8]])]

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        results = await asyncio.gather(*(s.submit(w) for w in long_rows + short_rows))
        return fake, results

    fake, results = run(main)
    for work, result in zip(long_rows + short_rows, results):
        check_result(result, work)
    assert [b.shape for b in fake.batches] == [(2, 16), (2, 16), (2, 4)]
    assert fake.first_tokens(0) == [1, 2] and fake.first_tokens(2) == [9, 8]


def test_rows_of_different_adapters_share_a_batch_and_keep_their_slot():
    b = adapter("b", 22)
    works = [make_work([[1, 2]], adapter=A), make_work([[3]]), make_work([[4]], adapter=b),
             make_work([[5, 6, 7]], adapter=A)]

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        await s.load(A)
        await s.load(b)
        results = await asyncio.gather(*(s.submit(w) for w in works))
        return fake, s, results

    fake, s, results = run(main)
    slot = {A.key: s.slots.get(A.key).slot, b.key: s.slots.get(b.key).slot}
    assert slot == {A.key: 1, b.key: 2}
    for work, result in zip(works, results):
        ref = work.adapter
        check_result(result, work, slot=slot[ref.key] if ref else 0,
                     payload=ref.payload if ref else 0)
    assert len(fake.batches) == 1
    assert fake.batches[0].slot_ids.tolist() == [1, 0, 2, 1]
    assert s.stats.max_adapters_in_a_batch == 3                 # slots 0, 1 and 2
    assert fake.writes == [(1, 11), (2, 22)]                    # no write per request
    assert fake.violations == []


def test_rows_that_could_never_run_are_refused_not_queued():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        with pytest.raises(ValueError, match="a sequence of 17 tokens"):
            await s.submit(make_work([[1] * 17], adapter=A))
        with pytest.raises(ValueError, match="a sequence of 0 tokens"):
            await s.submit(make_work([[1], []]))
        with pytest.raises(ValueError, match="3 layers requested"):
            await s.submit(make_work([[1]], (0, 1, 2)))
        with pytest.raises(ValueError, match="0 layers requested"):
            await s.submit(make_work([[1]], ()))
        assert s.in_flight() == 0 and s.rows_of("") == 0
        assert s.stats.forward_requests == 0
        assert fake.batches == [] and fake.writes == []
        assert not s.holds(A.key)                               # no slot claimed either
        work = make_work([[3]])
        check_result(await s.submit(work), work)                 # the loop still serves
        return fake

    fake = run(main)
    assert fake.tokens_sent() == [3]
    with pytest.raises(ValueError, match="must hold the smallest batch"):
        BatchingConfig(length_buckets=(32,), batch_buckets=(2, 4), max_batch_tokens=32)


# ---- cancellation, deadlines, failures ---------------------------------------------------


async def fill_the_device(s, fake):
    """Two batches of two 16-token rows each, held on the device: nothing
    else is sent until the gate opens. Returns (gate, their tasks)."""
    gate = fake.hold_batches()
    blockers = [asyncio.create_task(s.submit(make_work([[100 + k] * 16] * 2)))
                for k in range(MAX_IN_FLIGHT)]
    await until(lambda: fake.batches_running == MAX_IN_FLIGHT)
    return gate, blockers


def test_cancelled_and_expired_rows_never_reach_the_device():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        gate, blockers = await fill_the_device(s, fake)
        cancelled = asyncio.create_task(s.submit(make_work([[2], [3]])))
        expired = asyncio.create_task(s.submit(make_work([[4]], timeout_s=0.1)))
        await settle()
        assert s.in_flight() == 4 + 3
        cancelled.cancel()
        await settle()
        assert cancelled.cancelled()
        assert s.stats.sequences_cancelled == 2                 # dropped at once
        assert s.in_flight() == 4 + 1
        await asyncio.sleep(0.12)                                # past the deadline
        gate.set()
        with pytest.raises(DeadlineExpired):
            await expired
        for blocker in blockers:
            await blocker
        after = make_work([[9]], (1,))
        check_result(await s.submit(after), after)
        return fake, s

    fake, s = run(main)
    assert not {2, 3, 4} & set(fake.tokens_sent())
    assert s.stats.sequences_run == 5                            # the blockers' 4, then [9]
    assert s.stats.sequences_cancelled == 3                      # [2], [3] cancelled; [4] expired
    assert s.in_flight() == 0 and s.rows_of("") == 0


def test_a_row_already_past_its_deadline_fails_before_dispatch():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        with pytest.raises(DeadlineExpired):
            await s.submit(make_work([[4]], timeout_s=0.0))
        return fake, s

    fake, s = run(main)
    assert fake.batches == []
    assert s.stats.sequences_cancelled == 1 and s.in_flight() == 0


def test_a_failing_batch_fails_its_rows_and_the_loop_goes_on():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        await s.load(A)
        original = RuntimeError("device fell over")
        fake.batch_errors.append(original)
        works = [make_work([[1]]), make_work([[2]]), make_work([[3]], adapter=A)]
        errors = await asyncio.gather(*(s.submit(w) for w in works), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) and str(e) == "device fell over"
                   for e in errors)
        # Each request its own copy (their tracebacks do not pile up on one).
        assert len({id(e) for e in errors} | {id(original)}) == 4
        assert fake.real_rows() == [3]
        assert s.in_flight() == 0 and s.slots.get(A.key).pins == 0
        # A call that ends without an answer (not an Exception) fails its
        # rows as an unavailable worker.
        fake.batch_errors.append(asyncio.CancelledError())
        with pytest.raises(WorkerUnavailable):
            await s.submit(make_work([[6]]))
        later = [make_work([[4]], (1,)), make_work([[5]], adapter=A)]
        results = await asyncio.gather(*(s.submit(w) for w in later))
        check_result(results[0], later[0])
        check_result(results[1], later[1], slot=1, payload=11)
        return s

    s = run(main)
    assert s.stats.batches_run == 1 and s.stats.sequences_run == 2


# ---- the cost model ------------------------------------------------------------------------

LINEAR = 0.15   # a CPU: each padded row costs the same
FLAT = 0.5      # a GPU at small batches: a batch costs the same whatever its rows


def linear(rows_bucket):
    return LINEAR * rows_bucket


def flat(rows_bucket):
    return FLAT


def seed_timings(timings, cost, length=4, adapters=False):
    """Two runs of each rows bucket (a shape's first run is dropped as its
    compilation)."""
    for rows in CONFIG.batch_buckets:
        for _ in range(2):
            timings.record((rows, length, adapters, False), cost(rows))


def costed_fake(cost):
    """The fake reports `cost(rows bucket)` device seconds (none pass)."""
    return FakeExecutor(cost=lambda batch: cost(batch.shape[0]))


@pytest.mark.parametrize("cost, expected", [(linear, [2, 1]), (flat, [3])],
                         ids=["linear cost: trimmed to a full bucket", "flat cost: padded"])
def test_a_batch_is_trimmed_to_a_full_bucket_only_where_that_is_cheaper(cost, expected):
    """3 rows: a bucket of 4, or a full bucket of 2 (cheaper per row where
    cost grows with the rows) and then 1 row; the request's rows come back
    whole either way."""
    async def main():
        fake = costed_fake(cost)
        s = new_scheduler(fake)
        seed_timings(s.policy.timings, cost)
        work = make_work([[1], [2], [3]])
        check_result(await s.submit(work), work)
        return fake

    assert run(main).real_rows() == expected


def test_a_bucket_not_timed_for_a_while_runs_whole_again():
    """With linear costs 3 rows are trimmed to 2; once the 4-row bucket's
    time is 30 s old it is run whole, so it gets measured afresh."""
    now = [0.0]

    async def main():
        fake = costed_fake(linear)
        s = new_scheduler(fake)
        s.policy.timings = BatchTimings(clock=lambda: now[0])
        seed_timings(s.policy.timings, linear)
        await s.submit(make_work([[1], [2], [3]]))
        assert fake.real_rows() == [2, 1]
        now[0] = 31.0
        s.policy.timings.record((2, 4, False, False), linear(2))  # the 2-row bucket is fresh
        await s.submit(make_work([[1], [2], [3]]))
        return fake

    assert run(main).real_rows() == [2, 1, 3]


def test_adapter_rows_are_timed_apart_from_base_rows():
    """Timings of base-model batches say nothing of batches with adapters:
    3 adapter rows are not trimmed on the strength of base timings."""
    async def main():
        fake = costed_fake(linear)
        s = new_scheduler(fake)
        seed_timings(s.policy.timings, linear, adapters=False)
        await s.load(A)
        await s.submit(make_work([[1], [2], [3]], adapter=A))
        seed_timings(s.policy.timings, linear, adapters=True)
        await s.submit(make_work([[1], [2], [3]], adapter=A))
        return fake

    assert run(main).real_rows() == [3, 2, 1]


@pytest.mark.parametrize("cost, first, expected", [
    (linear, 2, [2, 2]),
    (linear, 3, [4]),
    (flat, 2, [4])],
    ids=["linear cost, 2 + 2: two batches cost what one does, runs at once",
         "linear cost, 3 + 1: 3 rows pad to 4 anyway, waits a little",
         "flat cost, 2 + 2: a second batch costs a whole one, waits"])
def test_stragglers_are_waited_for_only_as_long_as_it_can_pay(cost, first, expected):
    """After a batch of 4, `first` rows arrive and the rest a moment later.
    Waiting pays up to what a separate batch for the stragglers would cost
    the device (capped at a fifth of the last batch: 120 and 100 ms here)."""
    rows = [[1], [2], [3], [4]]

    async def main():
        fake = costed_fake(cost)
        s = new_scheduler(fake)
        seed_timings(s.policy.timings, cost)
        await s.submit(make_work([[7]] * 4))                    # the last batch had 4 rows
        early = asyncio.create_task(s.submit(make_work(rows[:first])))
        await settle()
        late_work, early_work = make_work(rows[first:]), make_work(rows[:first])
        check_result(await s.submit(late_work), late_work)
        check_result(await early, early_work)
        return fake

    fake = run(main)
    assert fake.real_rows() == [4] + expected


def test_after_an_idle_spell_a_lone_request_does_not_wait_for_the_last_batchs_callers():
    """As the flat-cost case above, but the rows come 0.25 s after the batch
    of 4 ended, longer than its callers take to come back (0.2 s): nobody is
    on their way, so the first 2 run at once and the other 2 separately."""
    async def main():
        fake = costed_fake(flat)
        s = new_scheduler(fake)
        seed_timings(s.policy.timings, flat)
        await s.submit(make_work([[7]] * 4))
        await asyncio.sleep(0.25)
        early = asyncio.create_task(s.submit(make_work([[1], [2]])))
        await settle()
        await s.submit(make_work([[3], [4]]))
        await early
        return fake

    assert run(main).real_rows() == [4, 2, 2]


def test_rows_trimmed_off_do_not_jump_ahead_of_older_skipped_rows():
    """A row that cannot share a batch (its layers would exceed the slots)
    is skipped while older rows run. Every batch here finds 3 rows for layer
    0, runs 2 (a full bucket) and leaves one: were the row left behind put
    ahead of the older skipped row, that row would wait as long as the load
    lasts. Rows keep their place by arrival."""
    async def main():
        fake = costed_fake(lambda bucket: 0.001 * bucket)
        s = new_scheduler(fake)
        seed_timings(s.policy.timings, lambda bucket: 0.001 * bucket)
        load = [asyncio.create_task(s.submit(make_work([[5], [6], [7]])))]
        odd_work = make_work([[9]], (1, 2))
        odd = asyncio.create_task(s.submit(odd_work))
        # Two more rows for layer 0 arrive while each batch runs.
        fake.during_batch = lambda batch: load.append(
            asyncio.create_task(s.submit(make_work([[5], [6]]))))
        await until(lambda: odd.done() or len(fake.batches) >= 40)
        fake.during_batch = None
        check_result(await odd, odd_work)
        await asyncio.gather(*load)
        return fake

    fake = run(main)
    ran_in = next(n for n, b in enumerate(fake.batches) if 9 in b.token_ids[:, 0].tolist())
    assert ran_in <= 2
    assert fake.real_rows()[:2] == [2, 2]                      # trimming did happen


# ---- pipelining ------------------------------------------------------------------------------


def test_at_most_two_batches_are_in_flight_and_the_second_goes_while_the_first_runs():
    works = [make_work([[k] * 16]) for k in range(1, 9)]        # 2 rows a batch: 4 batches

    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        gate = fake.hold_batches()
        tasks = [asyncio.create_task(s.submit(w)) for w in works]
        await until(lambda: fake.batches_running == 2)
        await settle()
        assert len(fake.batches) == 2                           # the third waits...
        assert s.in_flight() == 8
        gate.set()
        results = await asyncio.gather(*tasks)
        return fake, results

    fake, results = run(main)
    for work, result in zip(works, results):
        check_result(result, work)
    assert fake.real_rows() == [2, 2, 2, 2]
    assert fake.max_batches_running == MAX_IN_FLIGHT == 2       # ...and never a third out


# ---- fairness ----------------------------------------------------------------------------


def test_a_tenant_with_a_few_short_rows_is_not_queued_behind_one_with_many_long_ones():
    """Tenant A queues 12 rows of 16 tokens (two a batch), tenant B two rows
    of 1 token while the device is held; once it is free, B's rows go in the
    first two batches, not after A's eight left."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        gate = fake.hold_batches()
        a = asyncio.create_task(s.submit(make_work([[100 + k] * 16 for k in range(12)]), "A"))
        await until(lambda: fake.batches_running == 2)         # A's first 4 rows
        b = [asyncio.create_task(s.submit(make_work([[k]]), "B")) for k in (1, 2)]
        await settle()
        assert s.rows_of("A") == 12 and s.rows_of("B") == 2
        gate.set()
        await asyncio.gather(a, *b)
        return fake

    fake = run(main)
    batches_with_b = [n for n, b in enumerate(fake.batches)
                      if {1, 2} & set(fake.first_tokens(n))]
    assert batches_with_b == [2, 3]
    assert len(fake.batches) == 7


# ---- fine-tune turns -------------------------------------------------------------------


def fine_tune_work(steps):
    return types.SimpleNamespace(job_id="job-1", total_steps=steps)


async def forward_traffic(s, stop, senders=8):
    """Requests of one 16-token row (two a batch), sent back to back until
    `stop` is set; each result is checked. Eight senders: rows are always
    queued, even with two batches out."""
    async def sender(k):
        served = 0
        while not stop.is_set():
            work = make_work([[k + 1] * 16])
            check_result(await s.submit(work), work)
            served += 1
        return served
    return [asyncio.create_task(sender(k)) for k in range(senders)]


async def pipeline_depth(s, fake):
    """How many batches the scheduler sends at once now (2 unless a training
    turn was never handed back)."""
    gate = fake.hold_batches()
    tasks = [asyncio.create_task(s.submit(make_work([[50 + k] * 16]))) for k in range(6)]
    await settle()
    depth = fake.batches_running
    gate.set()
    await asyncio.gather(*tasks)
    fake.batch_gate = None
    return depth


def dispatch_order(fake):
    """'S' for each training step and 'B' for each forward batch, in the
    order the worker received them."""
    return "".join({"step": "S", "batch": "B"}[e[0]] for e in fake.log
                   if e[0] in ("step", "batch"))


def test_training_steps_and_forward_batches_take_turns():
    steps = 5

    async def main():
        fake = FakeExecutor()
        fake.batch_ticks = 5            # a step ends while the batch beside it still runs
        fake.step_reports.extend(StepReport(loss=1.0 / (i + 1), tokens=10)
                                 for i in range(steps))
        fake.adapter_out = sentinel = object()
        s = new_scheduler(fake)
        stop = asyncio.Event()
        senders = await forward_traffic(s, stop)
        await until(lambda: len(fake.batches) >= 2)             # forward traffic flowing
        progress = [p async for p in train(s, fine_tune_work(steps), asyncio.Event())]
        stop.set()
        served = await asyncio.gather(*senders)
        return fake, progress, sentinel, served

    fake, progress, sentinel, served = run(main)
    assert progress[-1]["state"] == "succeeded" and progress[-1]["adapter"] is sentinel
    running = [p for p in progress if p["state"] == "running"]
    assert running[-1]["step"] == steps and running[-1]["loss"] == pytest.approx(1 / steps)
    assert running[0]["first_loss"] == 1.0
    assert [c for c, _ in fake.fine_tune_calls] == ["start"] + ["step"] * (steps + 1) + [
        "finish"]
    order = dispatch_order(fake)
    first, last = order.index("S"), order.rindex("S")
    between = order[first:last + 1].split("S")[1:-1]            # batches between two steps
    # Neither starves: a forward batch between any two steps, and the next
    # step within two batches (the step asks again the moment it ends).
    assert len(between) == steps and all(1 <= len(b) <= 2 for b in between), order
    assert all(served)                                          # every sender got through
    assert fake.max_running == MAX_IN_FLIGHT                    # never a third call out
    assert fake.overlaps >= steps                               # each step beside a batch
    assert "drop" not in [c for c, _ in fake.fine_tune_calls]


def test_cancelling_a_fine_tune_ends_it_cancelled_and_drops_it():
    async def main():
        fake = FakeExecutor()
        fake.step_reports.extend(StepReport(loss=1.0, tokens=10) for _ in range(10))
        s = new_scheduler(fake)
        cancelled = asyncio.Event()
        progress = []
        async for update in train(s, fine_tune_work(10), cancelled):
            progress.append(update)
            if update["state"] == "running":                  # step 1 is always reported
                cancelled.set()
        await settle()
        return fake, s, progress, await pipeline_depth(s, fake)

    fake, s, progress, depth = run(main)
    assert [p["state"] for p in progress] == ["running", "cancelled"]
    assert progress[-1]["step"] == 1
    assert [c for c, _ in fake.fine_tune_calls] == ["start", "step", "drop"]
    assert depth == 2                                            # its turns were all handed back


def test_a_non_finite_loss_fails_the_job_and_drops_it():
    async def main():
        fake = FakeExecutor()
        fake.step_reports.extend([StepReport(loss=2.0, tokens=10),
                                  StepReport(loss=math.nan, tokens=10),
                                  StepReport(loss=1.0, tokens=10)])
        s = new_scheduler(fake)
        with pytest.raises(FineTuneFailed, match="loss became nan at step 2"):
            async for _ in train(s, fine_tune_work(3), asyncio.Event()):
                pass
        await settle()
        return fake, await pipeline_depth(s, fake)

    fake, depth = run(main)
    assert [c for c, _ in fake.fine_tune_calls] == ["start", "step", "step", "drop"]
    assert depth == 2


def test_a_job_cancelled_while_waiting_for_its_turn_leaves_no_turn_behind():
    async def main():
        fake = FakeExecutor()
        fake.step_reports.append(StepReport(loss=1.0, tokens=10))
        s = new_scheduler(fake)
        gate, blockers = await fill_the_device(s, fake)

        async def job():
            async for _ in train(s, fine_tune_work(1), asyncio.Event()):
                pass
        task = asyncio.create_task(job())
        await settle()
        assert [c for c, _ in fake.fine_tune_calls] == ["start"]   # waits for a turn
        task.cancel()
        await settle()
        gate.set()
        await asyncio.gather(*blockers)
        fake.batch_gate = None
        await settle()
        return fake, await pipeline_depth(s, fake)

    fake, depth = run(main)
    assert [c for c, _ in fake.fine_tune_calls] == ["start", "drop"]
    assert depth == 2


# ---- a worker going down -------------------------------------------------------------------


def test_worker_down_fails_every_queued_row_and_a_down_scheduler_refuses_at_once():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake)
        await s.load(A)
        gate, blockers = await fill_the_device(s, fake)
        queued = [asyncio.create_task(s.submit(make_work([[1], [2]]), "t")),
                  asyncio.create_task(s.submit(make_work([[3]], adapter=A), "t"))]
        await settle()
        assert s.in_flight() == 4 + 3 and s.rows_of("t") == 3 and s.rows_of("") == 4
        assert s.holds(A.key) and s.slots.get(A.key).pins == 1
        s.worker_down(WorkerUnavailable("w0 is restarting"))
        errors = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(e, WorkerUnavailable) for e in errors)
        assert errors[0] is not errors[1]
        assert s.in_flight() == 4 and s.rows_of("t") == 0
        assert s.slots.get(A.key).pins == 0
        with pytest.raises(WorkerUnavailable):
            await s.submit(make_work([[4]]))
        with pytest.raises(WorkerUnavailable):
            async with s.training_turn():
                pass
        assert s.in_flight() == 4 and s.stats.forward_requests == 4  # the refused one uncounted
        gate.set()
        for blocker in blockers:
            await blocker                                      # what ran still answers
        return fake, s

    fake, s = run(main)
    assert not {1, 2, 3, 4} & set(fake.tokens_sent())
    assert len(fake.batches) == 2 and s.in_flight() == 0


# ---- the cost model's timings ------------------------------------------------------------


def test_a_worker_going_down_fails_a_training_turn_still_waiting_and_grants_none():
    """A step waiting for its turn when the worker dies hears at once (not
    after the restart), and no turn is granted to a down worker."""
    async def main():
        fake = FakeExecutor()
        fake.step_reports.extend([StepReport(loss=1.0, tokens=10)] * 3)
        s = new_scheduler(fake)
        gate, blockers = await fill_the_device(s, fake)
        job = asyncio.create_task(_drain(train(s, fine_tune_work(3), asyncio.Event())))
        await settle()
        assert [c for c, _ in fake.fine_tune_calls] == ["start"]     # waiting for a turn
        s.worker_down(WorkerUnavailable("w0 died"))
        with pytest.raises(WorkerUnavailable):
            await job
        gate.set()
        await asyncio.gather(*blockers)
        await settle()
        return fake

    fake = run(main)
    assert [c for c, _ in fake.fine_tune_calls] == ["start", "drop"]   # no step ran


async def _drain(updates):
    async for _ in updates:
        pass


def test_a_batch_answered_with_too_few_rows_fails_its_rows_instead_of_hanging():
    async def main():
        fake = FakeExecutor()
        real = fake.run_batch

        async def short(batch):
            result = await real(batch)
            return BatchResult(result.tensors[:-1], result.device_seconds)
        fake.run_batch = short
        s = new_scheduler(fake)
        outcomes = await asyncio.gather(s.submit(make_work([[1], [2]])),
                                        return_exceptions=True)
        fake.run_batch = real
        return outcomes, await s.submit(make_work([[3]])), s

    outcomes, later, s = run(main)
    assert isinstance(outcomes[0], ValueError)      # zip(strict=True): the count is checked
    assert s.in_flight() == 0 and later.tensors     # nothing leaked; the next one runs


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
