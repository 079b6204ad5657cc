"""EinsumDense whose low-precision products come out in float32 first."""

import keras

from gemma_core.matmul_precision import wide_einsum


@keras.saving.register_keras_serializable(package="gemma_core")
class GemmaEinsumDense(keras.layers.EinsumDense):
    """keras' EinsumDense (same weights, LoRA, config), but a bfloat16 or
    float16 product is computed with float32 output, then cast to the
    compute dtype.

    The result is the same up to rounding (both accumulate in float32), but
    XLA's CPU backend runs bf16 x bf16 -> f32 dots in native bf16 kernels
    (AMX / AVX512-BF16 where present) and bf16 -> bf16 ones by converting
    every operand to float32 on each call: several times slower, and the
    converted weights take memory. GPUs accumulate in float32 either way.
    Bias and activation are not used by Gemma and keep keras' path.
    """

    def call(self, inputs, training=None):
        plain = (self.bias is None and not self.quantization_mode
                 and self.activation in (None, keras.activations.linear))
        if not plain:
            return super().call(inputs, training=training)
        return wide_einsum(self.equation, inputs, self.kernel, self.compute_dtype)
