"""Which adapter is in which slot of one worker's LoRA table.

The worker's scheduler is the only writer of that table, so this record is
exact, not a mirror. Plain bookkeeping, no I/O: the scheduler writes slots
and tells the table when a write ended.

A slot is pinned while rows that use it are queued or running, so it is
never rewritten under a batch that reads it. When every slot is taken, the
least recently used unpinned, loaded one is reused.
"""

from __future__ import annotations

import collections
import dataclasses

from coordinator.forward_work import AdapterRef


@dataclasses.dataclass(eq=False)
class SlotEntry:
    """One adapter's slot.

    Attributes:
        slot: its index in the table (1..num_slots; 0 is the base model).
        adapter: the adapter, with the payload a restarted worker is sent.
        pins: rows (or explicit loads) queued or running with it.
        loaded: False while its write runs.
        unload_when_idle: unloaded while pinned: freed at its last unpin.
    """

    slot: int
    adapter: AdapterRef
    pins: int = 0
    loaded: bool = False
    unload_when_idle: bool = False

    @property
    def key(self) -> str:
        return self.adapter.key


class AdapterSlotTable:
    """Slots 1..num_slots for adapters.

    Args:
        num_slots: how many adapters can be resident at once.
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"a worker needs at least one adapter slot, got {num_slots}.")
        self.num_slots = num_slots
        # key -> entry, least recently used first.
        self._entries: collections.OrderedDict[str, SlotEntry] = collections.OrderedDict()
        self._free = list(range(num_slots, 0, -1))  # pop() gives slot 1 first
        self.loads = 0
        self.evictions = 0

    def get(self, key: str) -> SlotEntry | None:
        return self._entries.get(key)

    def resident(self) -> list[str]:
        """Keys whose slots are written, least recently used first."""
        return [key for key, entry in self._entries.items() if entry.loaded]

    def claim(self, adapter: AdapterRef) -> tuple[SlotEntry, bool] | None:
        """The entry for `adapter`, pinned once, and whether it is new (the
        caller must then write its slot and call `written` or `failed`);
        None when every slot is pinned or being written."""
        entry = self._entries.get(adapter.key)
        new = entry is None
        if new:
            slot = self._take_slot()
            if slot is None:
                return None
            entry = SlotEntry(slot=slot, adapter=adapter)
            self._entries[adapter.key] = entry
        entry.pins += 1
        entry.unload_when_idle = False  # wanted again: an earlier unload is void
        self._entries.move_to_end(adapter.key)
        return entry, new

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, entry in self._entries.items():  # least recently used first
            if entry.pins == 0 and entry.loaded:
                del self._entries[key]
                self.evictions += 1
                return entry.slot
        return None

    def written(self, entry: SlotEntry) -> None:
        entry.loaded = True
        self.loads += 1
        self._free_if_unloaded(entry)

    def failed(self, entry: SlotEntry) -> None:
        """Its write failed: the slot is free again (its rows are failed by
        the caller)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self._free.append(entry.slot)

    def unpin(self, entry: SlotEntry) -> bool:
        """One pin fewer; True when the slot became free or evictable."""
        entry.pins -= 1
        if entry.pins:
            return False
        self._free_if_unloaded(entry)
        return True

    def unload(self, key: str) -> bool:
        """Frees `key`'s slot now (True), or, while rows use it or it is
        being written, at its last unpin (False)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.unload_when_idle = True
        return self._free_if_unloaded(entry)

    def _free_if_unloaded(self, entry: SlotEntry) -> bool:
        if (entry.unload_when_idle and entry.pins == 0 and entry.loaded
                and self._entries.get(entry.key) is entry):
            del self._entries[entry.key]
            self._free.append(entry.slot)
            return True
        return False

    def forget_writes(self) -> list[SlotEntry]:
        """For a restarted worker, whose table is zeros again: every entry
        becomes unwritten; returns them, for the caller to write again."""
        entries = list(self._entries.values())
        for entry in entries:
            entry.loaded = False
        return entries
