"""The plain data a forward request becomes once validated, and its result."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from worker.score_picks import ScoreSpec


@dataclasses.dataclass(frozen=True)
class ForwardWork:
    """A validated forward request.

    Attributes:
        request_id: for logs, end to end.
        sequences: int32 token ids, each non-empty and within the limits.
        layers: normalized layer indices in [0, num_layers], distinct.
        pooling: one of worker.batch.POOLINGS.
        dtype: one of worker.batch.OUTPUT_DTYPES.
        dimensions, normalize: the embedding options (worker.batch.embed).
        timeout_s: seconds the caller still waits, or None.
        adapter: the LoRA adapter every sequence runs with; None for the
            base model.
        truncated: tokens dropped from each sequence to fit the longest
            bucket, when the request asked for truncation (else all 0, or
            empty).
        scores: for a Score request, what each sequence asks of the head
            (its one layer is the final output); empty for Forward.
    """

    request_id: str
    sequences: tuple[np.ndarray, ...]
    layers: tuple[int, ...]
    pooling: str = "none"
    dtype: str = "float32"
    dimensions: int = 0
    normalize: bool = False
    timeout_s: float | None = None
    adapter: "AdapterRef | None" = None
    truncated: tuple[int, ...] = ()
    scores: tuple[ScoreSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request runs with, and where a worker gets it.

    Attributes:
        key: unique per adapter version across tenants (the coordinator's
            "tenant/name@version"); what slots are keyed by.
        payload: a Ray ObjectRef to the `LoraAdapter`, passed to a worker
            only when its scheduler writes it into a slot.
    """

    key: str
    payload: Any


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """`tensors[i][j]`: sequence i at layer `layers[j]`, pooled and cast (a
    Score request: `tensors[i]` is sequence i's `RowScores`); `worker_ms`:
    the request's time in its worker's scheduler (queue and batch), for the
    coordinator's log line."""

    worker_id: str
    tensors: list[list[np.ndarray]]
    worker_ms: float = 0.0

