"""The plain data a forward request becomes on its way to a worker."""

from __future__ import annotations

import dataclasses

import numpy as np

POOLINGS = ("none", "last_token", "mean")
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")


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
    """

    request_id: str
    sequences: tuple[np.ndarray, ...]
    layers: tuple[int, ...]
    pooling: str = "none"
    dtype: str = "float32"
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """`tensors[i][j]`: sequence i at layer `layers[j]`, pooled and cast."""

    worker_id: str
    tensors: list[list[np.ndarray]]
