"""The plain data a forward request becomes on its way to a worker."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_dtypes
import numpy as np

POOLINGS = ("none", "last_token", "mean")
# A request's output dtype name -> the numpy dtype results are cast to.
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class ForwardWork:
    """A validated forward request.

    Attributes:
        request_id: for logs, end to end.
        sequences: int32 token ids, each non-empty and within the limits.
        layers: normalized layer indices in [0, num_layers], distinct.
        pooling: one of POOLINGS.
        dtype: one of OUTPUT_DTYPES.
        timeout_s: seconds the caller still waits, counted from when the work
            was sent, or None. Relative, because the coordinator's and the
            worker's clocks may disagree across nodes.
        adapter: the LoRA adapter every sequence runs with; None for the
            base model.
        truncated: tokens dropped from each sequence to fit the longest
            bucket, when the request asked for truncation (else all 0, or
            empty).
    """

    request_id: str
    sequences: tuple[np.ndarray, ...]
    layers: tuple[int, ...]
    pooling: str = "none"
    dtype: str = "float32"
    timeout_s: float | None = None
    adapter: "AdapterRef | None" = None
    truncated: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request runs with, and where a worker gets it.

    Attributes:
        key: unique per adapter version across tenants (the coordinator's
            "tenant/name@version"); what slots are keyed by.
        payload: a Ray ObjectRef to the `LoraAdapter`, fetched only by a
            worker that does not hold `key` yet.
    """

    key: str
    payload: Any


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """`tensors[i][j]`: sequence i at layer `layers[j]`, pooled and cast;
    `worker_ms`: the request's time inside the worker (queue, batch, pooling),
    for the coordinator's log line."""

    worker_id: str
    tensors: list[list[np.ndarray]]
    worker_ms: float = 0.0


# How a caller hears one request of a group answered as soon as it is:
# deliver(index in the group, its ForwardResult or the exception it raised).
Deliver = Callable[[int, "ForwardResult | BaseException"], None]
