"""EinsumDense whose low-precision products come out in float32 first, and
whose per-head projections also take LoRA in PEFT's factor form."""

import keras
from keras import ops

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

    `enable_lora(..., shared_input=True)` on a (heads, d, head_dim) kernel
    (query, key, value) factors the update as PEFT does, one a (d, r) for
    all heads and b (r, heads, head_dim), instead of keras' per-head a
    (heads, d, r) and shared b (r, head_dim): lora_targets explains why both
    are needed.
    """

    # True once LoRA is enabled in PEFT's form (see the class docstring).
    lora_shared_input = False

    def call(self, inputs, training=None):
        plain = (self.bias is None and not self.quantization_mode
                 and self.activation in (None, keras.activations.linear))
        if not plain:
            return super().call(inputs, training=training)
        return wide_einsum(self.equation, inputs, self.kernel, self.compute_dtype)

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform",
                    b_initializer="zeros", shared_input=False):
        """keras' `enable_lora`, or with `shared_input` PEFT's factor form.

        Example:
        >>> block.attention.query.enable_lora(4, shared_input=True)
        >>> block.attention.query.lora_kernel_a.shape   # (d, 4)
        """
        if not shared_input:
            return super().enable_lora(rank, lora_alpha, a_initializer, b_initializer)
        if not self.built:
            raise ValueError("Cannot enable lora on a layer that isn't yet built.")
        if self.lora_enabled:
            raise ValueError("lora is already enabled. This can only be done once per layer.")
        if len(self._kernel.shape) != 3 or self.quantization_mode:
            raise ValueError(f"{self.name}: LoRA in PEFT's form needs an unquantized "
                             f"(heads, d, head_dim) kernel, not {tuple(self._kernel.shape)}.")
        heads, d, head_dim = self._kernel.shape
        # Variables may only be added to a built layer with its tracker
        # unlocked, as keras' own enable_lora does. Same names as keras'
        # factors, so every rule about "lora_kernel" (excluded from
        # fingerprints and presets) holds for these too.
        self._tracker.unlock()
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a", shape=(d, rank),
            initializer=keras.initializers.get(a_initializer), dtype="float32")
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b", shape=(rank, heads, head_dim),
            initializer=keras.initializers.get(b_initializer), dtype="float32")
        self._kernel.trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_shared_input = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    @property
    def kernel(self):
        if not (self.lora_enabled and self.lora_shared_input):
            return super().kernel
        update = ops.einsum("dr,rnh->ndh", self.lora_kernel_a, self.lora_kernel_b)
        return ops.cast(ops.add(self._kernel, (self.lora_alpha / self.lora_rank) * update),
                        self.compute_dtype)
