"""Adapters whose values would overflow the model are refused on every way
in (constructor, safetensors tensors, keras_hub file); one just under the
limit keeps hidden states finite."""

import io

import numpy as np
import pytest

from gemma_core import GemmaBackbone, LoraAdapter
from gemma_core.default_preset import DEFAULT_CONFIG
from gemma_core.gemma_lora import keras_hub_lora_index, write_lora_file
from gemma_core.lora_adapter import MAX_LORA_MAGNITUDE, MalformedAdapter


def uniform(a_value, b_value, rank=1, alpha=1.0, config=DEFAULT_CONFIG, flip=False):
    """Every query and value projection with a = a_value and b = b_value
    everywhere (signs alternating over the input in `flip`)."""
    kernels = {}
    for block in range(config.num_layers):
        for target in ("query", "value"):
            heads = config.num_query_heads if target == "query" else config.num_key_value_heads
            a = np.full((heads, config.hidden_dim, rank), a_value, "float32")
            if flip:
                a[:, ::2] *= -1
            kernels[(block, target)] = (a, np.full((rank, config.head_dim), b_value, "float32"))
    return LoraAdapter(rank=rank, alpha=alpha, kernels=kernels)


def attack_factor_row():
    """A trained-looking adapter but for one row of b at 3e38."""
    adapter = LoraAdapter.random(DEFAULT_CONFIG, rank=4, seed=0, std=0.02)
    kernels = dict(adapter.kernels)
    a, b = kernels[(2, "value")]
    b = b.copy()
    b[1] = 3e38
    kernels[(2, "value")] = (a, b)
    return kernels


def test_the_two_attack_adapters_are_refused_naming_where_and_how_much():
    with pytest.raises(MalformedAdapter, match=r"block 2 value: .*lora_b is 3e\+38.*"
                                               r"limit of 10000"):
        LoraAdapter(rank=4, alpha=4.0, kernels=attack_factor_row())
    small = LoraAdapter.random(DEFAULT_CONFIG, rank=1, seed=0, std=0.02)
    with pytest.raises(MalformedAdapter, match=r"block 0 query: .*\(alpha / rank\) \* lora_b "
                                               r"is \d.*e\+3\d"):
        LoraAdapter(rank=1, alpha=3e38, kernels=small.kernels)


def test_the_bound_covers_the_product_and_what_is_computed_on_the_way():
    # Each factor within the limit, their update not: 1e3 * 1e3 * rank 2.
    with pytest.raises(MalformedAdapter, match=r"update .* may reach 2e\+06"):
        uniform(1e3, 1e3, rank=2, alpha=2.0)
    # x @ a overflows even where b is zero (0 * inf is NaN).
    with pytest.raises(MalformedAdapter, match="an entry of lora_a is 1e\\+30"):
        uniform(1e30, 0.0)
    uniform(0.0, 1e3, alpha=10.0)  # a zero a: nothing reaches the model
    with pytest.raises(MalformedAdapter, match="positive number"):
        uniform(1.0, 1.0, alpha=float("inf"))


def test_every_way_in_refuses_them(tmp_path):
    kernels = attack_factor_row()
    tensors = LoraAdapter.random(DEFAULT_CONFIG, rank=4, seed=0).tensors()
    tensors["blocks.2.value.lora_b"] = kernels[(2, "value")][1]
    with pytest.raises(MalformedAdapter, match="block 2 value"):
        LoraAdapter.from_tensors(tensors, {"rank": "4", "alpha": "4.0"})
    path = tmp_path / "attack.lora.h5"
    write_lora_file(path, 4, {
        keras_hub_lora_index(block, target, DEFAULT_CONFIG.use_post_attention_norm,
                             DEFAULT_CONFIG.use_post_ffw_norm): pair
        for (block, target), pair in kernels.items()})
    with pytest.raises(MalformedAdapter, match="block 2 value"):
        LoraAdapter.from_lora_file(path, DEFAULT_CONFIG)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_adapter_just_under_the_limit_keeps_hidden_states_finite(dtype):
    """The worst alignment: a and b constant (or a alternating), every
    projection of every block, the update bound at 0.99 of the limit."""
    base = GemmaBackbone.from_preset("default")
    ids = np.random.default_rng(0).integers(0, DEFAULT_CONFIG.vocabulary_size, (2, 48))
    inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones((2, 48), "int32")}
    for flip in (False, True):
        adapter = uniform(100.0, 0.99 * MAX_LORA_MAGNITUDE / 100, flip=flip)
        model = GemmaBackbone.from_config({**base.get_config(), "dtype": dtype})
        model.set_weights(base.get_weights())
        adapter.apply_to(model)
        states = model.hidden_states(inputs, layers=list(range(DEFAULT_CONFIG.num_layers + 1)))
        assert all(np.isfinite(np.asarray(state, "float32")).all() for state in states)


def test_what_is_accepted_exports_and_imports_again(tmp_path):
    """The alpha is folded into b on export: within the limit, the file it
    makes is accepted again."""
    adapter = uniform(100.0, 9.9, alpha=10.0)
    buffer = io.BytesIO()
    adapter.write_lora_file(buffer, DEFAULT_CONFIG)
    (tmp_path / "back.lora.h5").write_bytes(buffer.getvalue())
    back = LoraAdapter.from_lora_file(tmp_path / "back.lora.h5", DEFAULT_CONFIG)
    np.testing.assert_allclose(back.kernels[(0, "query")][1] * back.scale, 99.0, rtol=1e-6)
