"""One sequence of a forward request, as a worker's scheduler holds it."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from coordinator.adapter_slot_table import SlotEntry
from coordinator.forward_work import AdapterRef, ForwardWork
from worker.score_picks import ScoreSpec


@dataclasses.dataclass(eq=False)
class QueuedRow:
    """A row from its arrival until it is answered, failed or dropped.

    Attributes:
        token_ids: its tokens (int32).
        work: the request it belongs to (layers, pooling, dtype, adapter).
        tenant: whose it is (fair shares, queue shares).
        deadline: the loop time after which it is not worth running; None.
        future: set to its tensors, or to the error that failed it.
        arrival: order of arrival, for ties.
        queued_at: the loop time it arrived.
        entry: its adapter's slot once one is claimed (None: not yet, or
            the base model).
        score: what it asks of the head, for a Score request's row.
    """

    token_ids: np.ndarray
    work: ForwardWork
    tenant: str
    deadline: float | None
    future: asyncio.Future
    arrival: int
    queued_at: float
    entry: SlotEntry | None = None
    score: ScoreSpec | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def adapter(self) -> AdapterRef | None:
        return self.work.adapter

    @property
    def ready(self) -> bool:
        """Whether it can go in a batch now: base model, or its slot written."""
        return self.adapter is None or (self.entry is not None and self.entry.loaded)

    @property
    def slot(self) -> int:
        return self.entry.slot if self.entry is not None else 0

