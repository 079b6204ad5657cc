"""A batch's scoring rows: what each asks of the language-model head, the
flat pick lists the worker's score program takes, and each row's answer.

The program (`gemma_core.token_scores.scores_at`) is compiled once per
bucket, so its sizes are fixed (token_scores.MAX_*).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from gemma_core.token_scores import MAX_CANDIDATES, MAX_TOP_K_POSITIONS

if TYPE_CHECKING:  # batch.py imports this module
    from worker.batch import Batch, BatchRow


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
    def of(cls, batch: "Batch") -> "ScorePicks | None":
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
        # Every scoring row asks for the final output: one layer slot.
        final = {row.layers[0] for _, row in scoring}
        assert len(final) == 1, f"scoring rows read different layer slots {final}"
        return cls(final.pop(), target_rows, target_positions, target_ids, n,
                   ranked_rows, ranked_positions, ranked_candidates, m)


def row_scores(outputs, picks: ScorePicks,
               rows: tuple["BatchRow", ...]) -> dict[int, RowScores]:
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
