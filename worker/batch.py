"""A padded batch as the scheduler hands it to a worker, and its results.

Everything here is plain numpy and tuples: it travels as the argument of
one Ray call, and the arrays are small (token ids, not activations).
A row either wants hidden states (pooled, cast) or scores from the
language-model head (`ScoreSpec`); one batch mixes both.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from worker.score_picks import RowScores, ScoreSpec

POOLINGS = ("none", "last_token", "mean")
# A request's output dtype name -> the numpy dtype results are cast to.
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """What one row of a batch wants back.

    Attributes:
        length: its real tokens (the rest of the row is padding).
        layers: positions in `Batch.layer_ids` of the layers it asked for,
            in the order it asked for them.
        pooling: one of POOLINGS.
        dtype: one of OUTPUT_DTYPES.
        dimensions: keep each vector's first this many values (0: all).
        normalize: then divide each vector by its L2 norm.
        score: for a scoring row, what it asks (its one layer is the final
            output); None for a row that wants hidden states.
    """

    length: int
    layers: tuple[int, ...]
    pooling: str = "none"
    dtype: str = "float32"
    dimensions: int = 0
    normalize: bool = False
    score: ScoreSpec | None = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded (rows, length) bucket, ready for the compiled forward.

    Attributes:
        token_ids: (B, T) int32; padded rows and positions hold 0.
        padding_mask: (B, T) int32, 1 on real tokens.
        layer_ids: (K,) int32 layers to return (K = the layer slots; unused
            ones repeat a used layer).
        slot_ids: (B,) int32 adapter slot per row; 0 is the base model.
        rows: one per real row (the first len(rows) of B).
    """

    token_ids: np.ndarray
    padding_mask: np.ndarray
    layer_ids: np.ndarray
    slot_ids: np.ndarray
    rows: tuple[BatchRow, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.token_ids.shape)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """`tensors[i][j]`: row i at its j-th requested layer, pooled and cast
    (a scoring row: its `RowScores` instead of the list); `device_seconds`:
    the forward's time on the device, without any wait in front of it (the
    scheduler's cost model)."""

    tensors: list[list[np.ndarray]]
    device_seconds: float


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """(tokens, d) -> what `pooling` keeps: (tokens, d), or (d,)."""
    if pooling == "last_token":
        return hidden[-1]
    if pooling == "mean":
        return hidden.astype(np.float32).mean(axis=0)
    return hidden


def embed(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """The embedding options on the last axis: its first `dimensions`
    values (0: all), then with `normalize` divided by the L2 norm (in
    float32; a zero vector stays zero)."""
    if dimensions:
        vectors = vectors[..., :dimensions]
    if not normalize:
        return vectors
    vectors = vectors.astype(np.float32)
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norm, np.finfo(np.float32).tiny)


def row_results(hidden: np.ndarray | None, rows: tuple[BatchRow, ...],
                scores: dict[int, RowScores] | None = None) -> list:
    """Each row's output: a scoring row its `RowScores` (from `scores`),
    any other row its tensors from the batch's (K, B, T, d) hidden states
    (views where no cast is needed: Ray serializes only the bytes a view
    covers)."""
    return [scores[i] if row.score is not None else
            [embed(pool(hidden[k, i, : row.length], row.pooling), row.dimensions,
                   row.normalize).astype(OUTPUT_DTYPES[row.dtype], copy=False)
             for k in row.layers] for i, row in enumerate(rows)]
