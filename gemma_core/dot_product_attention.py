"""Gemma's score-softmax-value step, plain (every score at once) and blocked.

Both take queries already rotated, scaled and laid out heads-first, and keys
and values as projected:

    q: (B, K, G, T, h)   K key/value heads, G = query heads per key head
    k, v: (B, S, K, h)   S == T (self-attention)
    padding_mask: (B, S) 1 for real tokens, 0 for padding

and return (B, K, G, T, h) in v's dtype. `dense_attention` materializes the
(B, K, G, T, S) scores; `blocked_attention` computes the same result one
(query block, key block) tile at a time with a running softmax, so its memory
grows linearly with T, and visits only the tiles a query block can see:
those on or below the diagonal and, in a sliding-window layer, within the
window's band.
"""

import jax.numpy as jnp
from jax import lax
from keras import ops

from gemma_core.matmul_precision import wide_einsum

# Queries and keys per tile of `blocked_attention`; sequences up to this
# length take `dense_attention`. Past a few hundred tokens the dense path's
# (T x T) scores spill out of the caches, so tiles win; this size was as
# fast as its neighbours (timings in benchmarks/README.md, "Figures moved
# from the code").
BLOCK_SIZE = 256

# Added to masked logits. Finite, so a row with no visible key (a padded
# query at the start of a left-padded row) gives a uniform distribution
# instead of NaN; its output is unspecified anyway.
MASKED_LOGIT = -1e9


def visible_keys(query_positions, key_positions, padding_mask, sliding_window_size=None):
    """Which keys each query may see.

    Args:
        query_positions: (Tq,) int positions i of the queries.
        key_positions: (Sk,) int positions j of the keys.
        padding_mask: (B, Sk) 1 for real keys, 0 for padding.
        sliding_window_size: if set, query i sees key j only when
            `i - j < sliding_window_size`.

    Returns:
        (B, Tq, Sk) bool: key j visible to query i when j <= i, j is not
        padding, and (if windowed) j is within the window.
    """
    i = ops.expand_dims(query_positions, 1)   # (Tq, 1)
    j = ops.expand_dims(key_positions, 0)     # (1, Sk)
    visible = j <= i
    if sliding_window_size is not None:
        visible = ops.logical_and(visible, i - j < sliding_window_size)
    keys = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)  # (B, 1, Sk)
    return ops.logical_and(ops.expand_dims(visible, 0), keys)


def _capped(logits, logit_soft_cap):
    if logit_soft_cap is None:
        return logits
    return ops.tanh(logits / logit_soft_cap) * logit_soft_cap


def dense_attention(q, k, v, padding_mask, logit_soft_cap=None, sliding_window_size=None,
                    dropout=None):
    """Attention with every (T x S) score materialized; `dropout`, if given,
    is applied to the probabilities. Shapes as in the module docstring."""
    length = ops.shape(padding_mask)[1]
    logits = wide_einsum("bkgth,bskh->bkgts", q, k)                      # float32
    logits = _capped(logits, logit_soft_cap)
    positions = ops.arange(length)
    mask = visible_keys(positions, positions, padding_mask, sliding_window_size)  # (B, T, S)
    logits = ops.where(mask[:, None, None, :, :], logits, MASKED_LOGIT)
    # Written out (not ops.softmax, which warns on one-token inputs).
    weights = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
    probs = ops.cast(weights / ops.sum(weights, axis=-1, keepdims=True), v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return wide_einsum("bkgts,bskh->bkgth", probs, v, v.dtype)


def blocked_attention(q, k, v, padding_mask, logit_soft_cap=None, sliding_window_size=None,
                      block_size=BLOCK_SIZE):
    """`dense_attention` computed tile by tile with a running softmax.

    For each block of `block_size` queries it scans the key blocks from the
    diagonal back as far as any of its queries can see (all of them in a
    global layer, ceil((window - 1) / block_size) + 1 in a windowed one),
    skipping those before the sequence start, and keeps per query the
    running maximum m, the running sum l of exp(logit - m) and the running
    sum of exp(logit - m) * value, all in float32; when m grows, l and the
    sum are rescaled by exp(m_old - m_new). Memory: O(T * block_size).
    Compute: O(T^2) in a global layer (half of the dense one), O(T * window)
    in a windowed one. T need not be a multiple of `block_size`: the inputs
    are padded, the padded keys masked, the padded queries dropped.

    Gradients flow through the scans (LoRA fine-tuning), but reverse mode
    keeps every visited tile's weights, so training memory stays O(T^2).
    """
    B, K, G, T, h = q.shape
    Q = block_size                 # queries per block; Q' below: the Q keys of a key block
    n = -(-T // Q)                                     # query blocks == key blocks
    pad = n * Q - T
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))  # (B, n*Q, K, h)
    padding_mask = jnp.pad(padding_mask, ((0, 0), (0, pad)))                # (B, n*Q)
    q_blocks = jnp.moveaxis(q.reshape(B, K, G, n, Q, h), 3, 0)             # (n, B, K, G, Q, h)
    # Key blocks a query block can need, ending at the diagonal. With a
    # window W, the oldest key of block qi's first query (qi * Q - W + 1)
    # lies ceil((W - 1) / Q) blocks back.
    band = n
    if sliding_window_size is not None:
        band = min(n, -(-(sliding_window_size - 1) // Q) + 1)

    def query_block(_, inputs):
        qi, q_block = inputs                                               # (), (B, K, G, Q, h)
        query_positions = qi * Q + jnp.arange(Q)

        def add_key_block(carry, kj):
            m, l, acc = carry                              # (B, K, G, Q) twice, (B, K, G, Q, h)
            start = kj * Q
            k_block = lax.dynamic_slice_in_dim(k, start, Q, axis=1)        # (B, Q', K, h)
            v_block = lax.dynamic_slice_in_dim(v, start, Q, axis=1)
            logits = wide_einsum("bkgqh,bskh->bkgqs", q_block, k_block)
            logits = _capped(logits, logit_soft_cap)
            mask = visible_keys(query_positions, start + jnp.arange(Q),
                                lax.dynamic_slice_in_dim(padding_mask, start, Q, axis=1),
                                sliding_window_size)                       # (B, Q, Q')
            logits = jnp.where(mask[:, None, None], logits, MASKED_LOGIT)
            # The result does not depend on m (it cancels), so no gradient
            # needs to flow through it.
            m_new = lax.stop_gradient(jnp.maximum(m, logits.max(axis=-1)))
            weights = jnp.exp(logits - m_new[..., None])                   # (B, K, G, Q, Q')
            rescale = jnp.exp(m - m_new)
            l = l * rescale + weights.sum(axis=-1)
            acc = acc * rescale[..., None] + wide_einsum(
                "bkgqs,bskh->bkgqh", weights.astype(v.dtype), v_block)
            return m_new, l, acc

        def step(carry, offset):
            # Key blocks from qi - band + 1 up to the diagonal qi; those
            # before the start do not exist (a real branch, not a select:
            # their work is skipped).
            kj = qi - band + 1 + offset
            carry = lax.cond(kj >= 0, add_key_block, lambda carry, _: carry, carry, kj)
            return carry, None

        # m starts at the masked logit, not -inf, so every rescale is finite.
        init = (jnp.full((B, K, G, Q), MASKED_LOGIT, jnp.float32),
                jnp.zeros((B, K, G, Q), jnp.float32),
                jnp.zeros((B, K, G, Q, h), jnp.float32))
        (_, l, acc), _ = lax.scan(step, init, jnp.arange(band))
        return None, (acc / l[..., None]).astype(v.dtype)

    _, out = lax.scan(query_block, None, (jnp.arange(n), q_blocks))        # (n, B, K, G, Q, h)
    return jnp.moveaxis(out, 0, 3).reshape(B, K, G, n * Q, h)[:, :, :, :T]
