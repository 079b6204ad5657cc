"""Which adapter sits in which slot of a worker's LoRA table.

Pure asyncio bookkeeping: the slot write itself is a callable (the sharded
backbone's jitted table update, run off the event loop), so serving goes on
while an adapter loads. A request pins its adapter's slot from before its
rows are queued until its result is back, so a slot is never rewritten
under a batch that reads it. When every slot is taken, the least recently
used unpinned one is reused; when all are pinned, a load waits for one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any, Awaitable, Callable

from worker.errors import AdapterSlotsBusy, DeadlineExpired

# write(slot, adapter) -> None; blocking, called on the load thread.
WriteSlot = Callable[[int, Any], Awaitable[None]]
Fetch = Callable[[], Awaitable[Any]]


@dataclasses.dataclass
class SlotStats:
    loads: int = 0
    evictions: int = 0
    last_load_ms: float = 0.0


@dataclasses.dataclass
class _Entry:
    slot: int
    pins: int = 0
    loading: asyncio.Task | None = None  # set while the slot is being written
    unload_when_idle: bool = False       # unloaded while in use: freed at its last release


class AdapterSlots:
    """Slots 1..num_slots for adapters (slot 0 is the base model).

    Args:
        num_slots: how many adapters can be resident at once.
        write_slot: coroutine writing an adapter into a slot.
    """

    def __init__(self, num_slots: int, write_slot: WriteSlot):
        if num_slots < 1:
            raise ValueError(f"a worker needs at least one adapter slot, got {num_slots}.")
        self.num_slots = num_slots
        self._write_slot = write_slot
        # key -> entry, least recently used first.
        self._resident: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._free = list(range(num_slots, 0, -1))  # pop() gives slot 1 first
        self._released = asyncio.Condition()
        self.stats = SlotStats()

    def resident(self) -> list[str]:
        return [key for key, entry in self._resident.items() if entry.loading is None]

    def holds(self, key: str) -> bool:
        """Whether `key` has a slot, loaded or loading: an acquire of it
        fetches nothing."""
        return key in self._resident

    async def acquire(self, key: str, fetch: Fetch, deadline: float | None = None) -> int:
        """The slot holding adapter `key`, pinned; loads it (via `fetch`) if
        it is not resident. Pair every acquire with `release(key)`.

        A load belongs to the table, not to the request that started it: a
        requester that is cancelled (or whose deadline passes) stops waiting,
        but the load finishes for the others and for the next request, so a
        slow load is never thrown away and retried forever.
        """
        while True:
            entry = self._resident.get(key)
            if entry is None:
                slot = self._take_slot()
                if slot is None:
                    await self._wait_for_release(deadline)
                    continue
                entry = _Entry(slot=slot)
                entry.loading = asyncio.get_running_loop().create_task(
                    self._load(key, entry, fetch))
                entry.loading.add_done_callback(_retrieve)
                self._resident[key] = entry
            entry.pins += 1
            entry.unload_when_idle = False  # wanted again: an earlier unload is void
            self._resident.move_to_end(key)
            if entry.loading is not None:
                try:
                    await asyncio.shield(entry.loading)
                except BaseException:
                    self._unpin(key, entry)
                    raise
            return entry.slot

    def release(self, key: str) -> None:
        entry = self._resident.get(key)
        if entry is not None:
            self._unpin(key, entry)

    def _unpin(self, key: str, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0:
            self._free_if_unloaded(key, entry)
            asyncio.get_running_loop().create_task(self._notify())

    def _free_if_unloaded(self, key: str, entry: _Entry) -> None:
        if (entry.unload_when_idle and entry.pins == 0 and entry.loading is None
                and self._resident.get(key) is entry):
            self._free_slot(key, entry)

    def unload(self, key: str) -> bool:
        """Frees `key`'s slot now (True), or, when requests are using it or
        it is loading, as soon as the last of them releases it (False)."""
        entry = self._resident.get(key)
        if entry is None:
            return False
        if entry.pins or entry.loading is not None:
            entry.unload_when_idle = True
            return False
        self._free_slot(key, entry)
        return True

    def _free_slot(self, key: str, entry: _Entry) -> None:
        del self._resident[key]
        self._free.append(entry.slot)

    async def _notify(self) -> None:
        async with self._released:
            self._released.notify_all()

    async def _wait_for_release(self, deadline: float | None) -> None:
        timeout = None if deadline is None else deadline - time.time()
        if timeout is not None and timeout <= 0:
            raise DeadlineExpired("the deadline passed while waiting for an adapter slot")
        try:
            async with self._released:
                await asyncio.wait_for(self._released.wait(), timeout)
        except asyncio.TimeoutError:
            raise AdapterSlotsBusy(
                f"all {self.num_slots} adapter slots are in use by running requests with "
                "other adapters until the deadline; retry, or start workers with more "
                "--max-adapters.") from None

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, entry in self._resident.items():  # least recently used first
            if entry.pins == 0 and entry.loading is None:
                del self._resident[key]
                self.stats.evictions += 1
                return entry.slot
        return None

    async def _load(self, key: str, entry: _Entry, fetch: Fetch) -> None:
        started = time.perf_counter()
        try:
            adapter = await fetch()
            await self._write_slot(entry.slot, adapter)
        except BaseException:
            if self._resident.get(key) is entry:
                del self._resident[key]
            self._free.append(entry.slot)
            asyncio.get_running_loop().create_task(self._notify())
            raise
        entry.loading = None
        self.stats.loads += 1
        self.stats.last_load_ms = 1e3 * (time.perf_counter() - started)
        if entry.pins == 0:  # its requesters gave up: the slot is free or evictable now
            self._free_if_unloaded(key, entry)
            asyncio.get_running_loop().create_task(self._notify())


def _retrieve(task: asyncio.Task) -> None:
    """Marks a load's failure as seen (its requesters may all have gone)."""
    if not task.cancelled():
        task.exception()
