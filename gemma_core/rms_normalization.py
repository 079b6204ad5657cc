"""Gemma's RMS normalization: float32 math, `(1 + scale)` gain."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="gemma_core")
class RMSNormalization(keras.layers.Layer):
    """`x / sqrt(mean(x**2) + epsilon) * (1 + scale)` over the last axis.

    Computed in float32 whatever the dtype policy, then cast back, because
    bf16 loses too much in the mean of squares. `scale` starts at zero so a
    fresh layer is a plain RMS normalization.

    Args:
        epsilon: added to the mean square before the square root.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros")
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(mean_square + self.epsilon)
        return ops.cast(normed * (1.0 + ops.cast(self.scale, "float32")), x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
