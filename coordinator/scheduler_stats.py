"""What a worker's scheduler counts (joined with the worker's own facts in
coordinator/worker_stats.py)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class SchedulerStats:
    forward_requests: int = 0
    batches_run: int = 0
    sequences_run: int = 0
    max_sequences_in_a_batch: int = 0
    sequences_cancelled: int = 0
    max_adapters_in_a_batch: int = 0
    batch_shapes: set = dataclasses.field(default_factory=set)
    batch_size_counts: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)  # rows in a batch -> batches
