"""Matmul precision that matches the compute dtype."""

import contextlib

import jax
import jax.numpy as jnp


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


def compute_summary(dtype_policy: str) -> str:
    """How a model of this dtype policy ("float32", "bfloat16",
    "mixed_bfloat16", ...) multiplies, in a few words (for the ready line and
    GetModelInfo)."""
    compute_dtype = str(dtype_policy).removeprefix("mixed_")
    if compute_dtype == "float32":
        return "float32 matmuls at full precision (no TF32 on GPUs)"
    return (f"{compute_dtype} matmul operands with float32 accumulation and output, "
            f"then cast to {compute_dtype}; norms, softmax and soft caps in float32")


def wide_einsum(equation, x, y, out_dtype=None):
    """`einsum(equation, x, y)` computed with float32 output, cast to
    `out_dtype` (None: stay float32).

    For bfloat16/float16 operands this is what the hardware does anyway
    (products accumulate in float32), said out loud: XLA's CPU backend then
    uses its native low-precision kernels instead of converting both
    operands to float32 on every call.
    """
    out = jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)
    return out if out_dtype is None else out.astype(out_dtype)
