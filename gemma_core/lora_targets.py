"""Where LoRA can go in a Gemma block, and the shapes its factors take.

Seven projections take LoRA: the attention's query, key, value and output,
and the feed-forward's two input branches and its output. Keras names them
by layer (`query`, `key`, `value`, `attention_output`, `ffw_gating`,
`ffw_gating_2`, `ffw_linear`), Hugging Face and PEFT by module
(`self_attn.q_proj`, ..., `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`);
docs/model.md has the table.

A pair (a, b) adds `scale * a @ b` to a projection's kernel. For query, key
and value two factorizations are in use (docs/model.md, "LoRA factor
forms"): keras_hub's gives every head its own a and shares b, a (heads, d,
r) and b (r, head_dim); PEFT's shares a and gives every head its own slice
of b, a (d, r) and b (r, heads, head_dim). Neither holds the other at the
same rank, but each rewrites exactly into the other at `heads` times the
rank (`to_per_head`, `to_shared`). For the other four projections the two
are the same.
"""

from __future__ import annotations

import numpy as np

from gemma_core.gemma_config import GemmaConfig

TARGETS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2",
           "ffw_linear")
ATTENTION_TARGETS = TARGETS[:4]
# What keras_hub adapts (and its `.lora.h5` files hold), and so our default.
KERAS_HUB_TARGETS = ("query", "value")
# The projections whose two factor forms differ.
HEAD_TARGETS = ("query", "key", "value")
PEFT_MODULES = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
                "value": "self_attn.v_proj", "attention_output": "self_attn.o_proj",
                "ffw_gating": "mlp.gate_proj", "ffw_gating_2": "mlp.up_proj",
                "ffw_linear": "mlp.down_proj"}
PEFT_NAMES = {module.split(".")[1]: target for target, module in PEFT_MODULES.items()}

KERAS_HUB_FORM = "keras_hub"
PEFT_FORM = "peft"
FORMS = (KERAS_HUB_FORM, PEFT_FORM)


def canonical_target(name: str) -> str:
    """Our name for a projection given ours, PEFT's (`q_proj`) or PEFT's
    module path (`self_attn.q_proj`).

    Example:
    >>> canonical_target("up_proj")
    'ffw_gating_2'
    """
    if name in TARGETS:
        return name
    for target, module in PEFT_MODULES.items():
        if name in (module, module.split(".")[1]):
            return target
    raise ValueError(f"{name!r} is not a LoRA target; use one of {TARGETS} or PEFT's "
                     f"{tuple(PEFT_NAMES)}.")


def heads(config: GemmaConfig, target: str) -> int:
    """The head count along the projection's head axis (0 for the
    feed-forward, which has none)."""
    if target in ("query", "attention_output"):
        return config.num_query_heads
    return config.num_key_value_heads if target in ("key", "value") else 0


def peft_axes(config: GemmaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input axes, output axes) of the projection as PEFT flattens them:
    its lora_A is (r, prod(input)) and lora_B (prod(output), r). Heads
    come before head_dim, as in Hugging Face's weights."""
    d, h, f = config.hidden_dim, config.head_dim, config.intermediate_dim // 2
    if target in HEAD_TARGETS:
        return (d,), (heads(config, target), h)
    return {"attention_output": ((config.num_query_heads, h), (d,)),
            "ffw_gating": ((d,), (f,)), "ffw_gating_2": ((d,), (f,)),
            "ffw_linear": ((f,), (d,))}[target]


def factor_shapes(config: GemmaConfig, target: str, rank: int,
                  form: str = KERAS_HUB_FORM) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a rank-`rank` pair on `target` of any block of `config`.

    Example:
    >>> factor_shapes(config, "query", 4)          # keras_hub: per-head a
    ((8, 2048, 4), (4, 256))
    >>> factor_shapes(config, "query", 4, "peft")  # PEFT: one a for all heads
    ((2048, 4), (4, 8, 256))
    """
    if form not in FORMS:
        raise ValueError(f"LoRA factor form must be one of {FORMS}, got {form!r}.")
    if target in HEAD_TARGETS and form == KERAS_HUB_FORM:
        return (heads(config, target), config.hidden_dim, rank), (rank, config.head_dim)
    inputs, outputs = peft_axes(config, target)
    return inputs + (rank,), (rank,) + outputs


def form_of(target: str, a: np.ndarray) -> str:
    """PEFT_FORM for a query/key/value pair whose a has no head axis, else
    KERAS_HUB_FORM (for the other projections the two forms coincide)."""
    return PEFT_FORM if target in HEAD_TARGETS and np.ndim(a) == 2 else KERAS_HUB_FORM


def update(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` in the kernel's own shape (unscaled), for either form.

    Example:
    >>> kernel = kernel + adapter.pair_scale(key) * update(*adapter.kernels[key])
    """
    if np.ndim(a) == 2 and np.ndim(b) == 3:  # PEFT form of query/key/value
        return np.einsum("dr,rnh->ndh", a, b)
    return np.matmul(a, b)


def to_per_head(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A PEFT-form pair, a (d, r) and b (r, n, h), as the keras_hub-form pair
    of rank n * r with the same update: head i's a holds the shared a in
    its own block of r columns (zeros elsewhere), and b stacks the heads'
    slices."""
    (d, r), n = a.shape, b.shape[1]
    per_head = np.zeros((n, d, n * r), a.dtype)
    for i in range(n):
        per_head[i, :, i * r:(i + 1) * r] = a
    return per_head, np.ascontiguousarray(b.transpose(1, 0, 2).reshape(n * r, b.shape[2]))


def to_shared(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse direction: a keras_hub-form pair, a (n, d, r) and b (r, h),
    as the PEFT-form pair of rank n * r with the same update (the heads' a
    side by side, b repeated on the block diagonal)."""
    n, d, r = a.shape
    shared = np.zeros((n * r, n, b.shape[1]), b.dtype)
    for i in range(n):
        shared[i * r:(i + 1) * r, i, :] = b
    return np.ascontiguousarray(a.transpose(1, 0, 2).reshape(d, n * r)), shared
