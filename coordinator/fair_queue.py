"""Rows waiting for one worker, served to tenants in fair shares of tokens.

Start-time fair queueing over tenants: each tenant has a count of tokens
served; the next row comes from the tenant that has been served least
(ties: the older row). A tenant that was idle starts level with the least
served busy tenant, or, with none busy, with the count of the last row
served (the queue's virtual clock, which never goes back), so idle time is
not banked as credit, even across a moment when the queue is empty. One tenant
sending many long sequences therefore gets the device in proportion to the
others, not in proportion to what it queued.
"""

from __future__ import annotations

import collections
import heapq
from typing import Callable, Generic, Iterator, Protocol, TypeVar


class QueuedRow(Protocol):
    tenant: str
    tokens: int    # the row's cost
    arrival: int   # order of arrival, for ties


Row = TypeVar("Row", bound=QueuedRow)


class FairQueue(Generic[Row]):
    """Per-tenant FIFO queues of rows; `in_fair_order` interleaves them."""

    def __init__(self):
        self._queues: dict[str, collections.deque[Row]] = {}
        self._served: dict[str, int] = {}
        self._clock = 0  # tokens served to its tenant before the last row served
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def __iter__(self) -> Iterator[Row]:
        for queue in self._queues.values():
            yield from queue

    def rows_of(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def push(self, row: Row) -> None:
        queue = self._queues.get(row.tenant)
        if queue is None:
            self._served[row.tenant] = max(self._served.get(row.tenant, 0), self._floor())
            queue = self._queues[row.tenant] = collections.deque()
        queue.append(row)
        self._rows += 1

    def _floor(self) -> int:
        """Where a tenant that was idle starts."""
        return min((self._served[t] for t in self._queues), default=self._clock)

    def in_fair_order(self, eligible: Callable[[Row], bool] = lambda row: True
                      ) -> Iterator[Row]:
        """The queued rows `eligible` says can go now, in the order fair
        shares would serve them (as if each were served as it is yielded;
        a row passed over charges nothing)."""
        served = {t: self._served[t] for t in self._queues}
        positions = dict.fromkeys(self._queues, 0)
        heap = [(served[t], q[0].arrival, t) for t, q in self._queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, tenant = heapq.heappop(heap)
            queue, i = self._queues[tenant], positions[tenant]
            row = queue[i]
            if eligible(row):
                yield row
                served[tenant] += row.tokens
            positions[tenant] = i + 1
            if i + 1 < len(queue):
                heapq.heappush(heap, (served[tenant], queue[i + 1].arrival, tenant))

    def remove(self, rows: list[Row], served: bool) -> None:
        """Takes `rows` out; `served`: they ran (their tenants are charged)."""
        gone = collections.defaultdict(set)
        for row in rows:
            gone[row.tenant].add(id(row))
            if served:
                self._clock = max(self._clock, self._served[row.tenant])
                self._served[row.tenant] += row.tokens
        for tenant, ids in gone.items():
            queue = self._queues[tenant]
            kept = collections.deque(r for r in queue if id(r) not in ids)
            self._rows -= len(queue) - len(kept)
            if kept:
                self._queues[tenant] = kept
            else:
                del self._queues[tenant]
        # Counts of tenants gone idle are kept (so they cannot restart below
        # the others) until the floor has caught up with them.
        if len(self._served) > 4 * len(self._queues) + 64:
            floor = self._floor()
            self._served = {t: s for t, s in self._served.items()
                            if t in self._queues or s > floor}
