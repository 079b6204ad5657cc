"""Adapter slots: the table's bookkeeping (pins, LRU eviction, failed
writes, unloads, rewrites after a restart), then the scheduler writing slots
on a fake worker (tests/coordinator/scheduler_support.py), whose table must
always match the scheduler's and never change under a row that reads it."""

import asyncio
import gc

import pytest

from coordinator.adapter_slot_table import AdapterSlotTable
from coordinator.worker_scheduler import WorkerScheduler
from scheduler_support import (CONFIG, FakeExecutor, adapter, check_result, make_work, settle,
                               until)
from worker.errors import AdapterRejected, AdapterSlotsBusy

A, B, C, X = adapter("a", 11), adapter("b", 22), adapter("c", 33), adapter("x", 99)


def run(main, timeout_s=5.0):
    return asyncio.run(asyncio.wait_for(main(), timeout_s))


def new_scheduler(fake, num_slots):
    return WorkerScheduler("w0", fake, CONFIG, num_slots)


def assert_table_exact(s, fake):
    """The scheduler's table says exactly what the worker holds, slot for slot."""
    ours = {s.slots.get(key).slot: s.slots.get(key).adapter.payload
            for key in s.slots.resident()}
    assert ours == fake.table


# ---- the table alone ----------------------------------------------------------------------


def test_claims_take_free_slots_in_order_and_a_claim_of_a_known_adapter_pins_it_again():
    table = AdapterSlotTable(2)
    a, new_a = table.claim(A)
    b, new_b = table.claim(B)
    assert (a.slot, new_a, b.slot, new_b) == (1, True, 2, True)
    assert table.resident() == []                       # nothing written yet
    again, new = table.claim(A)
    assert again is a and not new and a.pins == 2
    table.written(a)
    assert table.resident() == [A.key] and table.loads == 1
    with pytest.raises(ValueError, match="at least one adapter slot"):
        AdapterSlotTable(0)


def test_a_slot_pinned_or_being_written_is_never_taken():
    table = AdapterSlotTable(1)
    a, _ = table.claim(A)
    assert table.claim(B) is None                       # being written (and pinned)
    table.unpin(a)
    assert table.claim(B) is None                       # unpinned, but its write runs on
    table.written(a)
    table.claim(A)
    assert table.claim(B) is None                       # written, but pinned
    assert table.unpin(a)                               # the last pin: evictable
    b, new = table.claim(B)
    assert (b.slot, new, table.evictions) == (1, True, 1)
    assert table.get(A.key) is None


def test_the_least_recently_used_unpinned_loaded_slot_is_reused():
    table = AdapterSlotTable(2)
    for ref in (A, B):
        entry, _ = table.claim(ref)
        table.written(entry)
        table.unpin(entry)
    entry, new = table.claim(A)                         # A used again: B is now the oldest
    assert not new
    table.unpin(entry)
    c, new = table.claim(C)
    assert new and c.slot == 2 and table.evictions == 1
    table.written(c)
    assert table.resident() == [A.key, C.key] and table.loads == 3


def test_a_failed_write_frees_its_slot():
    table = AdapterSlotTable(1)
    x, _ = table.claim(X)
    table.failed(x)
    assert table.get(X.key) is None and table.resident() == []
    b, new = table.claim(B)
    assert (b.slot, new, table.evictions) == (1, True, 0)
    table.failed(x)                                     # a stale entry: frees nothing twice
    assert table.claim(C) is None


def test_unload_frees_a_slot_now_or_at_its_last_unpin_and_a_new_claim_voids_it():
    table = AdapterSlotTable(2)
    a, _ = table.claim(A)
    table.claim(A)
    table.written(a)
    assert not table.unload(A.key)                      # two rows read it
    assert table.resident() == [A.key]
    assert not table.unpin(a) and table.resident() == [A.key]
    assert table.unpin(a) and table.resident() == []    # freed at the last unpin
    assert not table.unload(A.key)                      # nothing left to free
    # Wanted again after an unload: the unload is void.
    c, _ = table.claim(C)
    table.written(c)
    assert not table.unload(C.key)
    table.claim(C)
    table.unpin(c)
    table.unpin(c)
    assert table.resident() == [C.key]
    # Unloaded during its write with nobody waiting: freed when the write ends.
    b, _ = table.claim(B)
    table.unpin(b)
    assert not table.unload(B.key)
    table.written(b)
    assert table.resident() == [C.key] and table.get(B.key) is None
    assert table.unload(C.key) and table.resident() == []
    assert table.evictions == 0


def test_forget_writes_makes_every_entry_unwritten_and_unevictable_until_rewritten():
    table = AdapterSlotTable(2)
    for ref in (A, B):
        entry, _ = table.claim(ref)
        table.written(entry)
        table.unpin(entry)
    entries = table.forget_writes()
    assert [(e.key, e.slot, e.loaded) for e in entries] == [(A.key, 1, False), (B.key, 2, False)]
    assert table.resident() == []
    assert table.claim(C) is None                       # both are being rewritten
    again, new = table.claim(A)
    assert again is entries[0] and not new              # no second write of its own


# ---- the scheduler's slots on a fake worker ---------------------------------------------------


def test_the_table_is_exact_and_the_least_recently_used_unpinned_slot_is_reused():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        await s.load(A)
        await s.load(B)
        work = make_work([[1]], adapter=A)                  # A used again: B is the oldest
        check_result(await s.submit(work), work, slot=1, payload=11)
        assert fake.writes == [(1, 11), (2, 22)]
        await s.load(C)
        assert fake.writes[-1] == (2, 33)
        assert s.slots.resident() == [A.key, C.key]
        assert s.slots.evictions == 1 and s.slots.loads == 3
        assert_table_exact(s, fake)
        work = make_work([[2]], adapter=B)                  # back: A is the oldest now
        check_result(await s.submit(work), work, slot=1, payload=22)
        assert s.slots.resident() == [C.key, B.key] and s.slots.evictions == 2
        assert_table_exact(s, fake)
        assert s.holds(B.key) and not s.holds(A.key)
        return fake

    assert run(main).violations == []


def test_load_reports_a_write_and_nothing_for_an_adapter_already_resident():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        first = await s.load(A)
        second = await s.load(A)
        return fake, s, first, second

    fake, s, first, second = run(main)
    assert first > 0.0 and second == 0.0
    assert fake.writes == [(1, 11)]
    assert s.slots.get(A.key).pins == 0                     # a load leaves no pin behind


def test_a_slot_read_by_a_running_batch_is_never_rewritten():
    """Both slots are read by batches on the device: an adapter wanted now
    waits for a slot; it is written only after the batch reading that slot
    has returned."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        gate = fake.hold_batches()
        wa, wb, wc = (make_work([[k]], adapter=ref) for k, ref in ((1, A), (2, B), (3, C)))
        ta = asyncio.create_task(s.submit(wa))
        await until(lambda: fake.batches_running == 1)
        tb = asyncio.create_task(s.submit(wb))
        await until(lambda: fake.batches_running == 2)
        tc = asyncio.create_task(s.submit(wc))
        await settle()
        assert not tc.done() and s.slots.get(C.key) is None
        assert fake.writes == [(1, 11), (2, 22)]
        gate.set()
        check_result(await ta, wa, slot=1, payload=11)
        check_result(await tb, wb, slot=2, payload=22)
        check_result(await tc, wc, slot=1, payload=33)   # A's slot: the least recently used
        assert_table_exact(s, fake)
        return fake

    fake = run(main)
    assert fake.violations == []
    assert fake.log.index(("write", 1, 33)) > fake.log.index(("batch done", 0))


def test_a_slot_of_a_queued_row_is_never_rewritten():
    """The device is full; rows of A and B wait in the queue, pinning both
    slots: C waits, and A's and B's rows still run with their own weights."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        await s.load(A)
        await s.load(B)
        gate = fake.hold_batches()
        blockers = [asyncio.create_task(s.submit(make_work([[100 + k] * 16] * 2)))
                    for k in range(2)]
        await until(lambda: fake.batches_running == 2)
        works = [make_work([[k]], adapter=ref) for k, ref in ((1, A), (2, B), (3, C))]
        tasks = [asyncio.create_task(s.submit(w)) for w in works]
        await settle()
        assert fake.writes == [(1, 11), (2, 22)]            # C waits for a slot
        assert s.in_flight() == 4 + 3
        gate.set()
        await asyncio.gather(*blockers)
        results = await asyncio.gather(*tasks)
        check_result(results[0], works[0], slot=1, payload=11)
        check_result(results[1], works[1], slot=2, payload=22)
        check_result(results[2], works[2], slot=1, payload=33)
        assert_table_exact(s, fake)
        return fake

    assert run(main).violations == []


def test_concurrent_requests_for_one_adapter_share_one_write_and_base_rows_do_not_wait():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 4)
        write = fake.hold_write(11)
        works = [make_work([[k]], adapter=A) for k in range(1, 6)]
        tasks = [asyncio.create_task(s.submit(w)) for w in works]
        load = asyncio.create_task(s.load(A))
        base_work = make_work([[9]])
        check_result(await s.submit(base_work), base_work)  # the base model runs meanwhile
        await settle()
        assert not load.done() and not any(t.done() for t in tasks)
        assert fake.writes == [(1, 11)]
        assert all(not b.slot_ids.any() for b in fake.batches)   # no row before its write
        write.set()
        for work, task in zip(works, tasks):
            check_result(await task, work, slot=1, payload=11)
        await load
        assert s.slots.get(A.key).pins == 0
        return fake

    fake = run(main)
    assert fake.writes == [(1, 11)] and fake.violations == []


def test_batches_never_include_a_row_whose_slot_write_has_not_finished():
    """Rows of a resident adapter and of one being written arrive together:
    the first go at once, the others only after their write."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 4)
        await s.load(A)
        write = fake.hold_write(22)
        wa, wb = make_work([[1], [2]], adapter=A), make_work([[3], [4]], adapter=B)
        ta, tb = asyncio.create_task(s.submit(wa)), asyncio.create_task(s.submit(wb))
        check_result(await ta, wa, slot=1, payload=11)
        await settle()
        assert not tb.done()
        write.set()
        check_result(await tb, wb, slot=2, payload=22)
        return fake

    fake = run(main)
    assert fake.violations == []
    assert [b.slot_ids[:len(b.rows)].tolist() for b in fake.batches] == [[1, 1], [2, 2]]


def test_a_failed_write_fails_the_rows_waiting_for_it_and_frees_the_slot():
    async def main():
        fake = FakeExecutor()
        fake.rejected[99] = AdapterRejected("rank 64 is above this worker's maximum")
        s = new_scheduler(fake, 1)
        outcomes = await asyncio.gather(s.submit(make_work([[1]], adapter=X)),
                                        s.submit(make_work([[2], [3]], adapter=X)),
                                        s.load(X), return_exceptions=True)
        assert all(isinstance(o, AdapterRejected) for o in outcomes), outcomes
        assert outcomes[0] is not outcomes[1]
        assert s.slots.get(X.key) is None and s.slots.resident() == []
        assert s.in_flight() == 0
        work = make_work([[4]], adapter=B)
        check_result(await s.submit(work), work, slot=1, payload=22)   # the slot is usable
        assert s.slots.evictions == 0
        return fake

    fake = run(main)
    assert fake.writes == [(1, 99), (1, 22)]
    assert set(fake.tokens_sent()) == {4}


def test_a_rejected_write_with_no_load_waiting_reports_nothing_unhandled():
    """Only requests wait for the write: they are failed; nothing is left for
    the loop to report as an exception never retrieved."""
    unhandled = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unhandled.append(context))
        fake = FakeExecutor()
        fake.rejected[99] = AdapterRejected("rank 64 is above this worker's maximum")
        s = new_scheduler(fake, 1)
        with pytest.raises(AdapterRejected):
            await s.submit(make_work([[1]], adapter=X))
        await settle()
        gc.collect()
        await settle()

    run(main)
    assert unhandled == []


def test_unload_of_a_slot_in_use_frees_it_at_its_last_use():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        gate = fake.hold_batches()
        work = make_work([[1], [2]], adapter=A)
        task = asyncio.create_task(s.submit(work))
        await until(lambda: fake.batches_running == 1)
        assert not s.unload(A.key)                          # not now...
        assert s.holds(A.key) and s.slots.resident() == [A.key]   # ...its rows read it
        gate.set()
        check_result(await task, work, slot=1, payload=11)
        assert not s.holds(A.key) and s.slots.resident() == []    # ...but at the last use
        assert not s.unload(A.key)                          # nothing left to free
        fake.batch_gate = None
        await s.load(B)
        await s.load(C)                                     # both slots free: no eviction
        assert s.slots.evictions == 0
        assert fake.table == {1: 22, 2: 33}
        assert_table_exact(s, fake)
        return fake

    run(main)


def test_an_unload_is_void_once_the_adapter_is_wanted_again():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 2)
        gate = fake.hold_batches()
        first, second = make_work([[1]], adapter=A), make_work([[2]], adapter=A)
        t1 = asyncio.create_task(s.submit(first))
        await until(lambda: fake.batches_running == 1)
        assert not s.unload(A.key)
        t2 = asyncio.create_task(s.submit(second))          # e.g. a request right after
        await settle()
        gate.set()
        check_result(await t1, first, slot=1, payload=11)
        check_result(await t2, second, slot=1, payload=11)
        return fake, s

    fake, s = run(main)
    assert s.slots.resident() == [A.key] and fake.writes == [(1, 11)]


def test_a_load_waits_while_every_slot_is_in_use():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 1)
        gate = fake.hold_batches()
        work = make_work([[1]], adapter=A)
        task = asyncio.create_task(s.submit(work))
        await until(lambda: fake.batches_running == 1)
        load = asyncio.create_task(s.load(B))
        await settle()
        assert not load.done() and fake.writes == [(1, 11)]
        gate.set()
        check_result(await task, work, slot=1, payload=11)
        assert await load > 0.0
        assert s.slots.resident() == [B.key] and s.slots.evictions == 1
        assert_table_exact(s, fake)
        return fake

    assert run(main).violations == []


def test_rows_waiting_for_a_slot_past_their_deadline_fail_adapter_slots_busy():
    """One slot, read by a batch on the device past B's deadline: B's row
    fails AdapterSlotsBusy; A, still wanted, is neither evicted nor
    overwritten for a row that is dropped anyway."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 1)
        gate = fake.hold_batches()
        work = make_work([[1]], adapter=A)
        task = asyncio.create_task(s.submit(work))
        await until(lambda: fake.batches_running == 1)
        late = asyncio.create_task(s.submit(make_work([[2]], adapter=B, timeout_s=0.1)))
        await settle()
        assert not late.done()
        await asyncio.sleep(0.12)                           # past B's deadline
        gate.set()
        check_result(await task, work, slot=1, payload=11)
        with pytest.raises(AdapterSlotsBusy, match="adapter slots"):
            await late
        await settle()
        return fake, s

    fake, s = run(main)
    assert s.stats.sequences_cancelled == 1
    assert fake.writes == [(1, 11)]
    assert s.slots.resident() == [A.key] and s.slots.evictions == 0


def test_rows_waiting_for_a_slot_fail_adapter_slots_busy_when_woken_past_their_deadline():
    """As above, but something else (another request) wakes the scheduler
    after B's deadline while A's slot is still read."""
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 1)
        gate = fake.hold_batches()
        task = asyncio.create_task(s.submit(make_work([[1]], adapter=A)))
        await until(lambda: fake.batches_running == 1)
        late = asyncio.create_task(s.submit(make_work([[2]], adapter=B, timeout_s=0.1)))
        await settle()
        await asyncio.sleep(0.12)
        other = asyncio.create_task(s.submit(make_work([[3]])))
        with pytest.raises(AdapterSlotsBusy):
            await late
        gate.set()
        await asyncio.gather(task, other)
        return fake

    assert run(main).writes == [(1, 11)]


def test_rewrite_slots_sends_every_resident_adapter_to_the_same_slot_again():
    async def main():
        fake = FakeExecutor()
        s = new_scheduler(fake, 3)
        for ref in (A, B, C):
            await s.load(ref)
        before = dict(fake.table)
        fake.table.clear()                                   # the worker restarted: zeros
        write = fake.hold_write(11)
        rewrite = asyncio.create_task(s.rewrite_slots())
        work = make_work([[1]], adapter=A)
        task = asyncio.create_task(s.submit(work))
        await settle()
        assert not task.done() and s.slots.resident() == [B.key, C.key]   # A waits for it
        write.set()
        assert await rewrite == []
        check_result(await task, work, slot=1, payload=11)
        assert fake.table == before == {1: 11, 2: 22, 3: 33}
        assert sorted(fake.writes[3:]) == [(1, 11), (2, 22), (3, 33)]
        assert_table_exact(s, fake)
        # One that the worker now refuses is dropped; the others stay.
        fake.table.clear()
        fake.rejected[22] = AdapterRejected("no longer fits")
        assert await s.rewrite_slots() == [B.key]
        assert set(s.slots.resident()) == {A.key, C.key}
        assert s.slots.get(B.key) is None
        assert_table_exact(s, fake)
        await s.load(adapter("d", 44))                        # B's slot is free again
        assert fake.table[2] == 44 and s.slots.evictions == 0
        return fake

    assert run(main).violations == []
