"""Matmul precision that matches the compute dtype."""

import contextlib

import jax


def matmul_precision(compute_dtype):
    """A scope in which float32 matmuls run in float32.

    On Ampere and later GPUs XLA's default runs float32 dots in TF32 (a
    10-bit mantissa): about 1e-3 relative error, far from the reference
    implementations' float32 outputs. A model that asks for float32 gets
    float32 arithmetic. bfloat16 and float16 models keep the default. CPUs
    compute float32 dots in float32 either way, so there it changes nothing.
    It applies while tracing, so a jitted function compiled inside it keeps
    the precision.
    """
    if str(compute_dtype) == "float32":
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()
