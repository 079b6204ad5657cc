"""One Gemma transformer block: attention then gated feed-forward."""

import keras
from keras import ops

from gemma_core.gemma_attention import GemmaAttention
from gemma_core.gemma_einsum_dense import GemmaEinsumDense
from gemma_core.matmul_precision import matmul_precision
from gemma_core.per_row_lora import add_per_row_lora
from gemma_core.rms_normalization import RMSNormalization


@keras.saving.register_keras_serializable(package="gemma_core")
class GemmaDecoderBlock(keras.layers.Layer):
    """Pre-norm residual block; Gemma 2 adds norms after each sub-block.

    ```
    x1 = x + dropout(post_attention_norm(attention(pre_attention_norm(x))))
    h  = pre_ffw_norm(x1)
    x  = x1 + post_ffw_norm(ffw_linear(gelu_tanh(ffw_gating(h)) * ffw_gating_2(h)))
    ```

    Args mirror `GemmaBackbone`'s, for one layer; `sliding_window_size` is
    None for a global layer.
    """

    def __init__(self, hidden_dim, intermediate_dim, num_query_heads,
                 num_key_value_heads, head_dim, query_scale,
                 use_post_ffw_norm=False, use_post_attention_norm=False,
                 attention_logit_soft_cap=None, sliding_window_size=None,
                 layer_norm_epsilon=1e-6, dropout=0.0, kernel_initializer=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.use_post_ffw_norm = use_post_ffw_norm
        self.use_post_attention_norm = use_post_attention_norm
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.sliding_window_size = sliding_window_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or "glorot_uniform")

    def _norm(self, name):
        return RMSNormalization(self.layer_norm_epsilon, name=name, dtype=self.dtype_policy)

    def _dense(self, equation, width, name):
        return GemmaEinsumDense(
            equation, output_shape=(None, width), name=name,
            kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)

    def build(self, input_shape):
        d, f = self.hidden_dim, self.intermediate_dim // 2
        self.pre_attention_norm = self._norm("pre_attention_norm")
        self.attention = GemmaAttention(
            self.num_query_heads, self.num_key_value_heads, self.head_dim,
            query_scale=self.query_scale,
            logit_soft_cap=self.attention_logit_soft_cap,
            sliding_window_size=self.sliding_window_size, dropout=self.dropout,
            kernel_initializer=self.kernel_initializer, name="attention",
            dtype=self.dtype_policy)
        self.pre_ffw_norm = self._norm("pre_ffw_norm")
        self.ffw_gating = self._dense("btd,df->btf", f, "ffw_gating")
        self.ffw_gating_2 = self._dense("btd,df->btf", f, "ffw_gating_2")
        self.ffw_linear = self._dense("btf,fd->btd", d, "ffw_linear")
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        for layer in (self.pre_attention_norm, self.attention, self.pre_ffw_norm,
                      self.ffw_gating, self.ffw_gating_2):
            layer.build(input_shape)
        self.ffw_linear.build((None, None, f))
        if self.use_post_attention_norm:
            self.post_attention_norm = self._norm("post_attention_norm")
            self.post_attention_norm.build(input_shape)
        if self.use_post_ffw_norm:
            self.post_ffw_norm = self._norm("post_ffw_norm")
            self.post_ffw_norm.build(input_shape)
        self.built = True

    def call(self, x, padding_mask, training=False, lora=None):
        with matmul_precision(self.compute_dtype):
            return self._residual_blocks(x, padding_mask, training, lora)

    def _residual_blocks(self, x, padding_mask, training, lora):
        a = self.attention(self.pre_attention_norm(x), padding_mask, training=training,
                           lora=lora)
        if self.use_post_attention_norm:
            a = self.post_attention_norm(a)
        x = x + self.dropout_layer(a, training=training)
        h = self.pre_ffw_norm(x)
        gate = add_per_row_lora(self.ffw_gating(h), h, lora, "ffw_gating",
                                "btd,bdr->btr", "btr,brf->btf")
        up = add_per_row_lora(self.ffw_gating_2(h), h, lora, "ffw_gating_2",
                              "btd,bdr->btr", "btr,brf->btf")
        f = ops.gelu(gate, approximate=True) * up
        f = add_per_row_lora(self.ffw_linear(f), f, lora, "ffw_linear",
                             "btf,bfr->btr", "btr,brd->btd")
        if self.use_post_ffw_norm:
            f = self.post_ffw_norm(f)
        return x + f

    def compute_output_spec(self, x, padding_mask, training=False, lora=None):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "use_post_ffw_norm": self.use_post_ffw_norm,
            "use_post_attention_norm": self.use_post_attention_norm,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "sliding_window_size": self.sliding_window_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
