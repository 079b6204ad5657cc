"""A token embedding that, reversed, is the language-model head."""

import keras
from keras import ops

from gemma_core.matmul_precision import matmul_precision, wide_einsum


@keras.saving.register_keras_serializable(package="gemma_core")
class ReversibleEmbedding(keras.layers.Embedding):
    """`keras.layers.Embedding` whose transpose maps hidden states to logits.

    Gemma ties its input embedding and output projection, so the one
    `(vocabulary, hidden)` matrix serves both directions.

    Args:
        input_dim: vocabulary size.
        output_dim: hidden size.
        logit_soft_cap: if set, reversed logits become
            `tanh(logits / cap) * cap`.

    Example:
    >>> emb = ReversibleEmbedding(256, 64)
    >>> hidden = emb(ops.zeros((1, 3), "int32"))            # (1, 3, 64)
    >>> logits = emb(hidden, reverse=True)                   # (1, 3, 256)
    """

    def __init__(self, input_dim, output_dim, logit_soft_cap=None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.logit_soft_cap = logit_soft_cap

    def call(self, inputs, reverse=False):
        if not reverse:
            return super().call(inputs)
        embeddings = ops.cast(self.embeddings, self.compute_dtype)
        # float32 logits straight from the product (see wide_einsum); the
        # soft cap is applied in float32 too: tanh saturates early in bf16.
        # As one 2-D product: in a loop (the worker's scoring, a block of
        # positions at a time) XLA's CPU backend copied the whole (V, d)
        # embedding transposed on every call for the 3-D form (0.7 s of a
        # 256,000 x 2304 bf16 head; benchmarks/README.md).
        leading = tuple(inputs.shape[:-1])
        with matmul_precision(self.compute_dtype):
            logits = wide_einsum("nd,vd->nv", ops.reshape(inputs, (-1, inputs.shape[-1])),
                                 embeddings)
        logits = ops.reshape(logits, leading + (self.input_dim,))
        if self.logit_soft_cap is not None:
            logits = ops.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap
        return logits

    def compute_output_spec(self, inputs, reverse=False):
        if not reverse:
            return super().compute_output_spec(inputs)
        return keras.KerasTensor(
            tuple(inputs.shape[:-1]) + (self.input_dim,), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "logit_soft_cap": self.logit_soft_cap}
