"""Scores from the language-model head: what a sequence's tokens cost, what
comes next, and which of a few answers the model prefers.

Everything is computed from the final hidden states through the tied
embedding with the final soft cap (`GemmaBackbone.logits`), in float32, and
never holds the whole (B, T, V) logits at once: positions go through the
head a block at a time, so scoring a long sequence on a 256,000-token
vocabulary stays within `MAX_LOGITS_BYTES` of logits. Pure and jit-able: the
worker runs it on the device, next to the forward.

Axes: B rows, T positions, d model width, V vocabulary, P top-k positions,
k top-k size, C candidate tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Most bytes of float32 logits one block of positions may hold.
MAX_LOGITS_BYTES = 256 << 20


def _log_softmax(backbone, hidden):
    """(B, N, d) -> (B, N, V) float32 log-probabilities of the next token."""
    return jax.nn.log_softmax(backbone.logits(hidden).astype(jnp.float32), axis=-1)


def token_logprobs(backbone, hidden, token_ids):
    """(B, T-1): log p(token_ids[:, t+1] | token_ids[:, :t+1]) for each t,
    teacher forcing (the first token has none). `hidden` (B, T, d) are the
    final hidden states of `token_ids` (B, T); rows' padding gives values
    the caller drops."""
    B, T, _ = hidden.shape
    V = backbone.config.vocabulary_size
    block = max(1, min(T - 1, MAX_LOGITS_BYTES // (4 * B * V)))
    parts = []
    for start in range(0, T - 1, block):
        stop = min(start + block, T - 1)
        log_probs = _log_softmax(backbone, hidden[:, start:stop])        # (B, blk, V)
        targets = token_ids[:, start + 1:stop + 1]                       # (B, blk)
        parts.append(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0])
    return jnp.concatenate(parts, axis=1) if parts else jnp.zeros((B, 0), jnp.float32)


def top_k(backbone, hidden, positions, k: int):
    """The k likeliest next tokens after each of `positions` (B, P):
    (ids (B, P, k) int32, log-probabilities (B, P, k)), likeliest first."""
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)   # (B, P, d)
    log_probs, ids = jax.lax.top_k(_log_softmax(backbone, picked), k)
    return ids.astype(jnp.int32), log_probs


def candidates(backbone, hidden, last, candidate_ids):
    """At position `last` (B,) of each row, the candidates (B, C): (their
    log-probabilities over the whole vocabulary, their probabilities
    normalized over the candidates alone), as a classifier such as
    ShieldGemma is read ("Yes" against "No")."""
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)        # (B, 1, d)
    log_probs = _log_softmax(backbone, picked)[:, 0]                          # (B, V)
    chosen = jnp.take_along_axis(log_probs, candidate_ids, axis=-1)            # (B, C)
    return chosen, jax.nn.softmax(chosen, axis=-1)
