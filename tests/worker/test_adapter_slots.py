"""Adapter slot bookkeeping: LRU eviction, pins, shared loads, failures."""

import asyncio
import time

import pytest

from worker.adapter_slots import AdapterSlots
from worker.errors import AdapterSlotsBusy


class Table:
    """Records slot writes; `delay` makes a load take time."""

    def __init__(self, delay=0.0):
        self.writes, self.delay = [], delay

    async def write(self, slot, adapter):
        await asyncio.sleep(self.delay)
        self.writes.append((slot, adapter))


def fetcher(name):
    async def fetch():
        return f"tensors of {name}"
    return fetch


def test_least_recently_used_unpinned_slot_is_reused():
    async def go():
        table = Table()
        slots = AdapterSlots(2, table.write)
        a = await slots.acquire("a", fetcher("a"))
        b = await slots.acquire("b", fetcher("b"))
        assert {a, b} == {1, 2}
        slots.release("a")
        slots.release("b")
        assert await slots.acquire("a", fetcher("a")) == a  # resident: no write
        slots.release("a")
        assert len(table.writes) == 2
        c = await slots.acquire("c", fetcher("c"))  # evicts b, used least recently
        assert c == b and slots.resident() == ["a", "c"]
        assert slots.stats.evictions == 1 and slots.stats.loads == 3
        assert table.writes[-1] == (b, "tensors of c")
    asyncio.run(go())


def test_a_pinned_slot_is_never_evicted_and_a_load_waits_for_a_release():
    async def go():
        slots = AdapterSlots(1, Table().write)
        await slots.acquire("a", fetcher("a"))          # pinned by a running request
        waiter = asyncio.create_task(slots.acquire("b", fetcher("b")))
        await asyncio.sleep(0.05)
        assert not waiter.done() and slots.resident() == ["a"]
        slots.release("a")
        assert await asyncio.wait_for(waiter, 1) == 1
        assert slots.resident() == ["b"]
    asyncio.run(go())


def test_all_slots_pinned_until_the_deadline_is_resource_exhausted():
    async def go():
        slots = AdapterSlots(1, Table().write)
        await slots.acquire("a", fetcher("a"))
        with pytest.raises(AdapterSlotsBusy, match="adapter slots are in use"):
            await slots.acquire("b", fetcher("b"), deadline=time.time() + 0.05)
        assert slots.resident() == ["a"]
    asyncio.run(go())


def test_concurrent_requests_for_one_adapter_share_its_load():
    async def go():
        table = Table(delay=0.05)
        slots = AdapterSlots(4, table.write)
        got = await asyncio.gather(*(slots.acquire("a", fetcher("a")) for _ in range(5)))
        assert len(set(got)) == 1 and len(table.writes) == 1
        for _ in range(5):
            slots.release("a")
        assert not slots.unload("b") and slots.unload("a") and slots.resident() == []
    asyncio.run(go())


def test_a_failed_load_frees_its_slot_and_tells_every_waiter():
    async def go():
        async def broken():
            await asyncio.sleep(0.02)
            raise ValueError("rank 64 is above this worker's maximum")
        slots = AdapterSlots(1, Table().write)
        results = await asyncio.gather(slots.acquire("a", broken), slots.acquire("a", broken),
                                       return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert slots.resident() == []
        assert await slots.acquire("b", fetcher("b")) == 1  # the slot is usable again
    asyncio.run(go())


def test_unload_of_a_slot_in_use_frees_it_at_its_last_release():
    async def go():
        slots = AdapterSlots(2, Table().write)
        await slots.acquire("a", fetcher("a"))
        await slots.acquire("a", fetcher("a"))   # two requests use it
        assert not slots.unload("a")             # not now...
        assert slots.resident() == ["a"]         # ...the requests keep reading it
        slots.release("a")
        assert slots.resident() == ["a"]
        slots.release("a")                       # ...but at the last release
        assert slots.resident() == []
        assert slots.unload("a") is False        # nothing left to free
        await slots.acquire("b", fetcher("b"))
        await slots.acquire("c", fetcher("c"))   # both slots free again: no eviction
        assert slots.stats.evictions == 0
    asyncio.run(go())


def test_unload_during_a_load_frees_the_slot_once_its_requester_is_done():
    async def go():
        slots = AdapterSlots(1, Table(delay=0.05).write)
        requester = asyncio.ensure_future(slots.acquire("a", fetcher("a")))
        await asyncio.sleep(0.01)                # the load is under way
        assert not slots.unload("a")
        assert await requester == 1              # the requester still gets its slot
        slots.release("a")
        assert slots.resident() == []

        # Its only requester gone before the load ends: freed when it does.
        requester = asyncio.ensure_future(slots.acquire("b", fetcher("b")))
        await asyncio.sleep(0.01)
        assert not slots.unload("b")
        requester.cancel()
        await asyncio.sleep(0.1)                 # the load finishes on its own
        assert slots.resident() == []

        # Wanted again after an unload: the unload is void.
        await slots.acquire("c", fetcher("c"))
        assert not slots.unload("c")
        await slots.acquire("c", fetcher("c"))   # e.g. LoadAdapter while a request runs
        slots.release("c")
        slots.release("c")
        assert slots.resident() == ["c"]
    asyncio.run(go())


def test_a_cancelled_requester_does_not_abort_a_shared_load():
    async def go():
        table = Table(delay=0.1)
        slots = AdapterSlots(2, table.write)
        first = asyncio.create_task(slots.acquire("a", fetcher("a")))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(slots.acquire("a", fetcher("a")))
        await asyncio.sleep(0.01)
        first.cancel()  # its client went away mid-load
        assert await asyncio.wait_for(second, 1) == 1
        assert slots.resident() == ["a"] and len(table.writes) == 1
        slots.release("a")
        assert slots.unload("a")  # the cancelled one left no pin behind
    asyncio.run(go())


def test_a_load_whose_requesters_left_wakes_those_waiting_for_a_slot():
    async def go():
        slots = AdapterSlots(1, Table(delay=0.05).write)
        requester = asyncio.ensure_future(slots.acquire("a", fetcher("a")))
        await asyncio.sleep(0.01)
        requester.cancel()                       # "a" loads on, unpinned
        waiter = asyncio.ensure_future(slots.acquire("b", fetcher("b")))
        # "b" gets the one slot once "a"'s load is done (not at some later release).
        assert await asyncio.wait_for(waiter, 5) == 1
        assert slots.resident() == ["b"]
    asyncio.run(go())
