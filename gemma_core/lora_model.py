"""An adapter inside a Keras `GemmaBackbone`: which projections get LoRA at
what rank and factor form, and setting or reading their factors.

The backbone's projection layers (`GemmaEinsumDense`) compute
`kernel + (lora_alpha / lora_rank) * a @ b`; every layer enabled here has
lora_alpha = lora_rank, so an adapter's own scale is folded into b.
"""

from __future__ import annotations

import numpy as np

from gemma_core.errors import AdapterMismatch
from gemma_core.lora_targets import HEAD_TARGETS, PEFT_FORM, form_of

Plan = dict  # (block, target) -> (rank, form)


def layer_plan(adapter, num_layers: int) -> Plan:
    """The LoRA each projection needs for `adapter` (a LoraAdapter): every
    block of every adapted target, at its pair's rank and form; blocks
    without a pair at the adapter's rank, in the form of that target's
    other pairs.

    Example:
    >>> layer_plan(adapter, backbone.num_layers)[(0, "query")]
    (4, 'peft')
    """
    plan = {}
    for target in adapter.targets:
        form = next(form_of(t, a) for (_, t), (a, _) in sorted(adapter.kernels.items())
                    if t == target)
        for block in range(num_layers):
            a = adapter.kernels.get((block, target), (None, None))[0]
            plan[(block, target)] = ((adapter.rank, form) if a is None
                                     else (a.shape[-1], form_of(target, a)))
    return plan


def set_factors(adapter, backbone) -> None:
    """`LoraAdapter.apply_to` once the adapter is known to fit: enables LoRA
    as `layer_plan` says on a backbone without it, else checks that every
    pair has a layer of its rank and form, then assigns every enabled
    layer (zeros where the adapter has no pair). Nothing is assigned
    unless every check passed.

    Example:
    >>> set_factors(adapter, backbone)
    """
    plan = layer_plan(adapter, backbone.num_layers)
    if backbone._lora_rank is None:
        backbone._enable_lora_layers(plan, adapter.rank)
    for block, target, layer in backbone._lora_layers():
        if (block, target) not in adapter.kernels:
            continue
        rank, form = plan[(block, target)]
        if not getattr(layer, "lora_enabled", False):
            raise AdapterMismatch(f"the backbone has LoRA enabled, but not on block {block} "
                                  f"{target}, which this adapter adapts.")
        if layer.lora_rank != rank:
            raise AdapterMismatch(f"the backbone has LoRA rank {layer.lora_rank} enabled on "
                                  f"block {block} {target}; this adapter has rank {rank} "
                                  "there.")
        if target in HEAD_TARGETS and layer.lora_shared_input != (form == PEFT_FORM):
            raise AdapterMismatch(f"block {block} {target}: the backbone's LoRA factors there "
                                  f"are not in the adapter's {form} form.")
    for block, target, layer in backbone._lora_layers():
        if not getattr(layer, "lora_enabled", False):
            continue
        pair = adapter.kernels.get((block, target))
        if pair is None:
            layer.lora_kernel_a.assign(np.zeros(layer.lora_kernel_a.shape, "float32"))
            layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, "float32"))
        else:
            layer.lora_kernel_a.assign(pair[0])
            layer.lora_kernel_b.assign(pair[1] * adapter.pair_scale((block, target)))


def read_factors(backbone) -> tuple[int, dict, dict]:
    """(the rank LoRA was enabled at, (block, target) -> (a, b) float32 of
    every enabled layer with its scale folded into b, (block, target) ->
    rank for layers of another rank).

    Raises:
        ValueError: LoRA is not enabled.
    """
    rank = backbone._lora_rank
    if rank is None:
        raise ValueError("LoRA is not enabled on this backbone; call enable_lora first.")
    kernels, ranks = {}, {}
    for block, target, layer in backbone._lora_layers():
        if not getattr(layer, "lora_enabled", False):
            continue
        a = np.asarray(layer.lora_kernel_a.numpy(), "float32")
        b = np.asarray(layer.lora_kernel_b.numpy(), "float32")
        if layer.lora_alpha != layer.lora_rank:  # keras' own scale, never set by us
            b = (b * (layer.lora_alpha / layer.lora_rank)).astype("float32")
        kernels[(block, target)] = (a, b)
        if layer.lora_rank != rank:
            ranks[(block, target)] = int(layer.lora_rank)
    return rank, kernels, ranks
