"""Gemma's grouped-query attention with rotary positions, soft cap and window."""

import keras
import numpy as np
from keras import ops

from gemma_core import dot_product_attention
from gemma_core.gemma_einsum_dense import GemmaEinsumDense
from gemma_core.per_row_lora import add_per_row_lora


def apply_rotary_embedding(x, base=10000.0):
    """Rotary position embedding, half-split convention, positions 0..T-1.

    Args:
        x: (B, T, N, H) queries or keys; T must be static (it is under jit).

    Returns:
        x rotated, same shape and dtype. The rotation is done in float32.
    """
    length, head_dim = x.shape[1], x.shape[-1]
    # The tables are built in numpy at trace time: as XLA constants they are
    # computed once, not re-derived with sin/cos for every element.
    inverse_frequency = base ** (-np.arange(0, head_dim, 2, dtype="float64") / head_dim)
    angles = np.arange(length, dtype="float64")[:, None] * inverse_frequency  # (T, H/2)
    cos = np.cos(angles).astype("float32")[:, None, :]                       # (T, 1, H/2)
    sin = np.sin(angles).astype("float32")[:, None, :]
    x32 = ops.cast(x, "float32")
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return ops.cast(rotated, x.dtype)


@keras.saving.register_keras_serializable(package="gemma_core")
class GemmaAttention(keras.layers.Layer):
    """Multi-head attention with grouped key/value heads.

    Query head n reads key/value head n // (num_query_heads //
    num_key_value_heads). Logits are soft-capped (if set) and soft-maxed in
    float32. Sequences longer than `dot_product_attention.BLOCK_SIZE` attend
    block by block (memory linear in the length); shorter ones, and training
    with dropout, materialize every score.

    Args:
        num_query_heads: H.
        num_key_value_heads: K; H must be a multiple of K.
        head_dim: size of each head.
        query_scale: factor on queries before the dot product.
        logit_soft_cap: if set, `logits = tanh(logits / cap) * cap`.
        sliding_window_size: if set, each query sees only that many most
            recent keys (itself included).
        dropout: rate on attention probabilities, training only.
    """

    def __init__(self, num_query_heads, num_key_value_heads, head_dim,
                 query_scale, logit_soft_cap=None, sliding_window_size=None,
                 dropout=0.0, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.logit_soft_cap = logit_soft_cap
        self.sliding_window_size = sliding_window_size
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or "glorot_uniform")

    def _projection(self, equation, output_shape, name):
        return GemmaEinsumDense(
            equation, output_shape=output_shape, name=name,
            kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)

    def build(self, inputs_shape):
        hidden_dim = inputs_shape[-1]
        H, K, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
        self.query = self._projection("btd,ndh->btnh", (None, H, h), "query")
        self.key = self._projection("bsd,kdh->bskh", (None, K, h), "key")
        self.value = self._projection("bsd,kdh->bskh", (None, K, h), "value")
        self.attention_output = self._projection(
            "btnh,nhd->btd", (None, hidden_dim), "attention_output")
        for projection in (self.query, self.key, self.value):
            projection.build(inputs_shape)
        self.attention_output.build((None, None, H, h))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def call(self, x, padding_mask, training=False, lora=None):
        """`lora`: optional per-row LoRA factors (LoraSlotTable.rows), added
        to the projections it names on top of any `enable_lora` kernels."""
        B, T = ops.shape(x)[0], ops.shape(x)[1]
        K, G, h = (self.num_key_value_heads,
                   self.num_query_heads // self.num_key_value_heads, self.head_dim)
        q = add_per_row_lora(self.query(x), x, lora, "query",
                             "btd,bndr->btnr", "btnr,bnrh->btnh")   # (B, T, H, h)
        k = add_per_row_lora(self.key(x), x, lora, "key",
                             "bsd,bkdr->bskr", "bskr,bkrh->bskh")   # (B, S, K, h)
        v = add_per_row_lora(self.value(x), x, lora, "value",
                             "bsd,bkdr->bskr", "bskr,bkrh->bskh")   # (B, S, K, h)
        q = apply_rotary_embedding(q)
        k = apply_rotary_embedding(k)
        q = q * ops.cast(self.query_scale, q.dtype)
        # Heads-first before the einsums: transposing the small q and output
        # is cheap; otherwise XLA transposes the (B, K, G, T, S) scores.
        q = ops.transpose(ops.reshape(q, (B, T, K, G, h)), (0, 2, 3, 1, 4))  # (B, K, G, T, h)
        if T <= dot_product_attention.BLOCK_SIZE or (training and self.dropout > 0):
            out = dot_product_attention.dense_attention(
                q, k, v, padding_mask, self.logit_soft_cap, self.sliding_window_size,
                dropout=lambda probs: self.dropout_layer(probs, training=training))
        else:
            out = dot_product_attention.blocked_attention(
                q, k, v, padding_mask, self.logit_soft_cap, self.sliding_window_size,
                block_size=dot_product_attention.BLOCK_SIZE)       # (B, K, G, T, h)
        out = ops.reshape(ops.transpose(out, (0, 3, 1, 2, 4)), (B, T, K * G, h))
        return add_per_row_lora(self.attention_output(out), out, lora, "attention_output",
                                "btnh,bnhr->btr", "btr,brd->btd")

    def compute_output_spec(self, x, padding_mask, training=False, lora=None):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "logit_soft_cap": self.logit_soft_cap,
            "sliding_window_size": self.sliding_window_size,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
