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

POOLINGS = ("none", "last_token", "mean")
# A request's output dtype name -> the numpy dtype results are cast to.
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
# The score program's fixed sizes (compiled once per bucket): the most
# next tokens listed per position, positions listed per row, candidates.
MAX_TOP_K, MAX_TOP_K_POSITIONS, MAX_CANDIDATES = 20, 16, 64


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """What a scoring row asks of the head (gemma_core/token_scores.py).

    Attributes:
        token_logprobs: each token's log-probability given those before it.
        top_k: list this many likeliest next tokens (0: none) ...
        positions: ... after each of these positions, in [0, length).
        candidates: token ids whose probabilities at the last position are
            wanted, over the vocabulary and normalized over themselves.
    """

    token_logprobs: bool = False
    top_k: int = 0
    positions: tuple[int, ...] = ()
    candidates: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RowScores:
    """A scoring row's answer; fields it did not ask for are None.

    Attributes:
        token_logprobs: (length - 1,) float32: token t+1 given tokens 0..t.
        top_ids, top_logprobs: (positions, top_k): likeliest first.
        candidate_logprobs: (C,) over the whole vocabulary.
        candidate_probs: (C,) normalized over the candidates.
    """

    token_logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    candidate_logprobs: np.ndarray | None = None
    candidate_probs: np.ndarray | None = None


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
    (a scoring row: its `RowScores` instead of the list); `device_seconds`: the forward's time on the device, without any wait
    in front of it (the scheduler's cost model)."""

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


@dataclasses.dataclass(frozen=True)
class ScorePicks:
    """A batch's scoring rows as the score program takes them: two flat
    lists of (row, position) picks, real ones first (N = B * T; M = B *
    (MAX_TOP_K_POSITIONS + 1)), see `gemma_core.token_scores.scores_at`.

    Attributes:
        final: the position in `Batch.layer_ids` of the final output.
        target_*: every position but the last of each row that wants token
            log-probabilities, with the token that follows it.
        ranked_*: each top-k position, and the last position of each row
            with candidates; `ranked_candidates` (M, MAX_CANDIDATES).
    """

    final: int
    target_rows: np.ndarray
    target_positions: np.ndarray
    target_ids: np.ndarray
    target_count: int
    ranked_rows: np.ndarray
    ranked_positions: np.ndarray
    ranked_candidates: np.ndarray
    ranked_count: int

    @classmethod
    def of(cls, batch: Batch) -> "ScorePicks | None":
        """The picks of `batch`'s scoring rows; None when it has none."""
        scoring = [(i, row) for i, row in enumerate(batch.rows) if row.score is not None]
        if not scoring:
            return None
        B, T = batch.shape
        target_rows, target_positions, target_ids = (np.zeros(B * T, "int32") for _ in range(3))
        M = B * (MAX_TOP_K_POSITIONS + 1)
        ranked_rows, ranked_positions = np.zeros(M, "int32"), np.zeros(M, "int32")
        ranked_candidates = np.zeros((M, MAX_CANDIDATES), "int32")
        n = m = 0
        for i, row in scoring:
            spec = row.score
            if spec.token_logprobs and row.length > 1:
                count = row.length - 1
                target_rows[n:n + count] = i
                target_positions[n:n + count] = np.arange(count)
                target_ids[n:n + count] = batch.token_ids[i, 1:row.length]
                n += count
            wanted = list(spec.positions if spec.top_k else ())
            if spec.candidates:
                wanted.append(row.length - 1)
            for position in wanted:
                ranked_rows[m], ranked_positions[m] = i, position
                ranked_candidates[m, :len(spec.candidates)] = spec.candidates
                m += 1
        return cls(scoring[0][1].layers[0], target_rows, target_positions, target_ids, n,
                   ranked_rows, ranked_positions, ranked_candidates, m)


def row_scores(outputs, picks: ScorePicks, rows: tuple[BatchRow, ...]) -> dict[int, RowScores]:
    """Each scoring row's `RowScores` from the score program's outputs
    (`scores_at`'s four arrays, on the host), by row index."""
    chosen, top_ids, top_logprobs, candidate_logprobs = outputs
    answers, n, m = {}, 0, 0
    for i, row in enumerate(rows):
        spec = row.score
        if spec is None:
            continue
        fields = {}
        if spec.token_logprobs:
            count = row.length - 1
            fields["token_logprobs"] = np.asarray(chosen[n:n + count], np.float32)
            n += count
        if spec.top_k:
            count = len(spec.positions)
            fields["top_ids"] = top_ids[m:m + count, :spec.top_k].astype(np.int32)
            fields["top_logprobs"] = top_logprobs[m:m + count, :spec.top_k].astype(np.float32)
            m += count
        if spec.candidates:
            chosen_here = candidate_logprobs[m, :len(spec.candidates)].astype(np.float64)
            shifted = np.exp(chosen_here - chosen_here.max())
            fields["candidate_logprobs"] = chosen_here.astype(np.float32)
            fields["candidate_probs"] = (shifted / shifted.sum()).astype(np.float32)
            m += 1
        answers[i] = RowScores(**fields)
    return answers


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
