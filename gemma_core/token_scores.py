"""Scores from the language-model head: what a sequence's tokens cost, what
comes next, and which of a few answers the model prefers.

Everything is computed from the final hidden states through the tied
embedding with the final soft cap (`GemmaBackbone.logits`), in float32, and
never holds more than `MAX_LOGITS_BYTES` of logits at once: the positions
asked for are gathered into one flat list of picks and go through the head
a block at a time, in a loop that stops after the last real pick. So
scoring a long sequence on a 256,000-token vocabulary stays small, and a
serving program compiled for a whole batch bucket costs only what its
rows asked for. Pure and jit-able: the worker runs it on the device, next
to the forward.

Axes: B rows, T positions, d model width, V vocabulary, N picks, P top-k
positions, k top-k size, C candidate tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Most bytes of float32 logits one block of picks may hold.
MAX_LOGITS_BYTES = 256 << 20
# Picks per block: each block costs a pass over the whole embedding, and a
# block is computed whole however few of its picks are real, so a batch
# asking one position per row should not pay for hundreds.
BLOCK_PICKS = 64
# Ranked picks (top-k positions, candidates) are few per row, often one.
RANKED_BLOCK_PICKS = 8
# The serving score program's fixed sizes (it is compiled once per batch
# bucket): the most next tokens listed per position, top-k positions per
# row, candidates per row.
MAX_TOP_K, MAX_TOP_K_POSITIONS, MAX_CANDIDATES = 20, 16, 64


def max_top_k(vocabulary_size: int) -> int:
    """The most next tokens one position lists: MAX_TOP_K, or the whole of a
    smaller vocabulary (top-k cannot take more than there are)."""
    return min(MAX_TOP_K, vocabulary_size)


def head_at(backbone, hidden, rows, positions, count, read, extras=(), block=BLOCK_PICKS):
    """Log-probabilities of the next token at picked positions, reduced by
    `read` a block at a time.

    Args:
        hidden: (B, T, d) final hidden states.
        rows, positions: (N,) int32: pick i is hidden[rows[i], positions[i]].
        count: int32 scalar: only the blocks holding picks before `count`
            are computed; outputs from `count` on are undefined.
        read: (log_probs (n, V) float32, *extras' blocks) -> a pytree of
            (n, ...) arrays.
        extras: (N, ...) arrays handed to `read` block by block.
        block: picks per block (at most MAX_LOGITS_BYTES of logits).

    Returns:
        `read`'s pytree, each leaf (N, ...).
    """
    V = backbone.config.vocabulary_size
    N = rows.shape[0]
    block = max(1, min(N, block, MAX_LOGITS_BYTES // (4 * V)))
    padded = -(-N // block) * block

    def fit(x):  # (N, ...) -> (padded // block, block, ...)
        x = jnp.pad(x, [(0, padded - N)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((padded // block, block) + x.shape[1:])

    def block_of(hidden, rows, positions, *extras):
        picked = hidden[rows, positions]                                # (n, d)
        logits = backbone.logits(picked[None])[0].astype(jnp.float32)   # (n, V)
        return read(jax.nn.log_softmax(logits, axis=-1), *extras)

    if N == 0:  # nothing picked: outputs of `read`'s shapes with no rows
        one = jax.ShapeDtypeStruct((1,), jnp.int32)
        shapes = jax.eval_shape(block_of, jax.ShapeDtypeStruct(
            (1, 1) + hidden.shape[2:], hidden.dtype), one, one, *(
            jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype) for x in extras))
        return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape[1:], s.dtype), shapes)
    rows, positions = fit(rows), fit(positions)
    extras = tuple(fit(x) for x in extras)

    def block_out(i):
        return block_of(hidden, rows[i], positions[i], *(x[i] for x in extras))

    shapes = jax.eval_shape(block_out, 0)
    outputs = jax.tree.map(lambda s: jnp.zeros((padded // block,) + s.shape, s.dtype), shapes)

    def body(state):
        i, outputs = state
        got = block_out(i)
        return i + 1, jax.tree.map(lambda out, new: out.at[i].set(new), outputs, got)

    blocks = (jnp.asarray(count, jnp.int32) + block - 1) // block
    _, outputs = jax.lax.while_loop(lambda state: state[0] < blocks, body,
                                    (jnp.int32(0), outputs))
    return jax.tree.map(lambda out: out.reshape((padded,) + out.shape[2:])[:N], outputs)


def _taken(log_probs, ids):
    """(n, V), (n, m) -> (n, m): each row's log-probabilities of its ids."""
    return jnp.take_along_axis(log_probs, ids, axis=-1)


def token_logprobs(backbone, hidden, token_ids):
    """(B, T-1): log p(token_ids[:, t+1] | token_ids[:, :t+1]) for each t,
    teacher forcing (the first token has none). `hidden` (B, T, d) are the
    final hidden states of `token_ids` (B, T); rows' padding gives values
    the caller drops."""
    B, T, _ = hidden.shape
    rows, positions = jnp.meshgrid(jnp.arange(B, dtype=jnp.int32),
                                   jnp.arange(T - 1, dtype=jnp.int32), indexing="ij")
    targets = jnp.asarray(token_ids, jnp.int32)[:, 1:].reshape(-1, 1)   # (B*(T-1), 1)
    got = head_at(backbone, hidden, rows.reshape(-1), positions.reshape(-1),
                  B * (T - 1), _taken, (targets,))
    return got.reshape(B, T - 1)


def top_k(backbone, hidden, positions, k: int):
    """The k likeliest next tokens after each of `positions` (B, P):
    (ids (B, P, k) int32, log-probabilities (B, P, k)), likeliest first."""
    B, P = positions.shape
    rows = jnp.repeat(jnp.arange(B, dtype=jnp.int32), P)
    log_probs, ids = head_at(backbone, hidden, rows, positions.reshape(-1).astype(jnp.int32),
                             B * P, lambda lp: jax.lax.top_k(lp, k))
    return ids.astype(jnp.int32).reshape(B, P, k), log_probs.reshape(B, P, k)


def candidates(backbone, hidden, last, candidate_ids):
    """At position `last` (B,) of each row, the candidates (B, C): (their
    log-probabilities over the whole vocabulary, their probabilities
    normalized over the candidates alone), as a classifier such as
    ShieldGemma is read ("Yes" against "No")."""
    B = last.shape[0]
    chosen = head_at(backbone, hidden, jnp.arange(B, dtype=jnp.int32),
                     jnp.asarray(last, jnp.int32), B, _taken,
                     (jnp.asarray(candidate_ids, jnp.int32),))
    return chosen, jax.nn.softmax(chosen, axis=-1)


def scores_at(backbone, hidden, targets, ranked, k: int):
    """What a serving batch's rows asked of the head, in two flat pick lists.

    Args:
        hidden: (B, T, d) final hidden states.
        targets: (rows (N,), positions (N,), ids (N,), count): the
            log-probability of token ids[i] after each pick.
        ranked: (rows (M,), positions (M,), candidate_ids (M, C), count):
            the top k next tokens after each pick, and the log-probabilities
            of its candidates there.

    Returns:
        (target log-probabilities (N,), top-k ids (M, k) int32, top-k
        log-probabilities (M, k), candidate log-probabilities (M, C)).
    """
    rows, positions, ids, count = targets
    chosen = head_at(backbone, hidden, rows, positions, count, _taken, (ids[:, None],))

    def rank(log_probs, candidate_ids):
        top_log_probs, top_ids = jax.lax.top_k(log_probs, k)
        return top_ids.astype(jnp.int32), top_log_probs, _taken(log_probs, candidate_ids)

    rows, positions, candidate_ids, count = ranked
    top_ids, top_log_probs, candidate_log_probs = head_at(
        backbone, hidden, rows, positions, count, rank, (candidate_ids,),
        block=RANKED_BLOCK_PICKS)
    return chosen[:, 0], top_ids, top_log_probs, candidate_log_probs
