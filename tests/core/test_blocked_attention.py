"""Blocked attention (running softmax) equals the plain one, at memory linear in T."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from fixture_support import FIXTURES, TINY_CONFIG, reference, reference_inputs
from gemma_core import (Backbone, FineTuneConfig, GemmaBackbone, LoraTrainer,
                        dot_product_attention)
from gemma_core.dot_product_attention import blocked_attention, dense_attention

BLOCK = 16


def attention_inputs(length, key_heads=2, groups=3, head_dim=8, seed=0):
    """q (3, K, G, T, h), k and v (3, T, K, h), and a padding mask whose rows
    are unpadded, left-padded and right-padded."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(3, key_heads, groups, length, head_dim)) * 2  # logits beyond the cap
    k = rng.normal(size=(3, length, key_heads, head_dim))
    v = rng.normal(size=(3, length, key_heads, head_dim))
    padding = np.ones((3, length), "int32")
    padding[1, : length // 3] = 0
    padding[2, length - length // 4:] = 0
    return *(jnp.asarray(x, "float32") for x in (q, k, v)), jnp.asarray(padding)


def real_queries(out, padding_mask):
    """(B, K, G, T, h) -> (real tokens, K, G, h): padded queries' outputs are
    unspecified."""
    return np.asarray(out).transpose(0, 3, 1, 2, 4)[np.asarray(padding_mask, bool)]


def gemma2_like(**overrides):
    """The tiny model with Gemma 2's kind of attention: even layers within a
    window (20 tokens), logits soft-capped (50)."""
    keras.utils.set_random_seed(0)
    return GemmaBackbone(**{**TINY_CONFIG, "use_sliding_window_attention": True,
                            "sliding_window_size": 20, "attention_logit_soft_cap": 50.0,
                            **overrides})


def token_batch(length=37):
    """(3, length) token ids and the padding mask of `attention_inputs`."""
    ids = np.random.default_rng(0).integers(0, TINY_CONFIG["vocabulary_size"], (3, length))
    return ids.astype("int32"), np.asarray(attention_inputs(length)[3])


@pytest.mark.parametrize("length", [5, 16, 37, 64])
@pytest.mark.parametrize("window, cap", [(None, None), (None, 2.0), (7, None), (24, 2.0),
                                         (100, None)])
def test_blocked_equals_dense(length, window, cap):
    q, k, v, padding = attention_inputs(length)
    expected = jax.jit(lambda *x: dense_attention(*x, cap, window))(q, k, v, padding)
    actual = jax.jit(lambda *x: blocked_attention(*x, cap, window, block_size=BLOCK))(
        q, k, v, padding)
    assert actual.shape == expected.shape
    # A padded query with no visible key still gets a finite output.
    assert np.isfinite(np.asarray(actual)).all()
    np.testing.assert_allclose(real_queries(actual, padding), real_queries(expected, padding),
                               atol=1e-5, rtol=0)


def test_blocked_gradients_equal_dense():
    """Fine-tuning differentiates through the scan (LoRA factors feed q and v)."""
    q, k, v, padding = attention_inputs(37)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), "float32")
    real = jnp.asarray(padding, "float32")[:, None, None, :, None]

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v) * weights * real)

    dense = jax.jit(jax.grad(lambda *x: loss(
        lambda q, k, v: dense_attention(q, k, v, padding, 2.0, 7), *x),
        argnums=(0, 1, 2)))(q, k, v)
    blocked = jax.jit(jax.grad(lambda *x: loss(
        lambda q, k, v: blocked_attention(q, k, v, padding, 2.0, 7, block_size=BLOCK), *x),
        argnums=(0, 1, 2)))(q, k, v)
    for expected, actual in zip(dense, blocked):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, block", [("gemma1_tiny", 5), ("gemma2_tiny", 4),
                                         ("gemma2_tiny", 5), ("hf_gemma2_tiny", 5)])
def test_fixtures_match_reference_through_blocked_path(name, block, monkeypatch):
    """The fixtures' 12-token inputs attended in blocks of 4 (a multiple of
    12) and 5 (not one); the Gemma 2 ones have a window of 4 and a cap of 2."""
    monkeypatch.setattr(dot_product_attention, "BLOCK_SIZE", block)
    ref = reference(name)
    inputs = reference_inputs(name)
    forward = Backbone.from_preset(FIXTURES / name).make_forward_fn()
    hidden = forward(inputs["token_ids"], inputs["padding_mask"])[0]
    real = ref["padding_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref["hidden_states"][real],
                               atol=1e-4, rtol=0)


def test_bfloat16_blocked_is_within_bf16_tolerance_of_dense(monkeypatch):
    backbone = gemma2_like(dtype="bfloat16")
    ids, padding = token_batch()
    dense = backbone.make_forward_fn()(ids, padding)[0]
    monkeypatch.setattr(dot_product_attention, "BLOCK_SIZE", BLOCK)
    blocked = backbone.make_forward_fn()(ids, padding)[0]
    assert str(blocked.dtype) == "bfloat16"
    real = padding.astype(bool)
    dense, blocked = (np.asarray(x, "float32")[real] for x in (dense, blocked))
    assert np.linalg.norm(blocked - dense) / np.linalg.norm(dense) < 3e-2


@pytest.mark.parametrize("name, mesh_shape", [("gemma1_tiny", (2, 4)), ("gemma2_tiny", (1, 8))])
def test_sharded_blocked_forward_matches_reference(name, mesh_shape, monkeypatch):
    """Under the layout map (query heads or head_dim split over the model
    axis) the scans over blocks run sharded and give the same result."""
    monkeypatch.setattr(dot_product_attention, "BLOCK_SIZE", 5)
    mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"],
                                         keras.distribution.list_devices())
    layout_map = GemmaBackbone.get_layout_map(
        mesh, config=Backbone.from_preset(FIXTURES / name, load_weights=False).get_config())
    try:
        with keras.distribution.ModelParallel(layout_map=layout_map,
                                              batch_dim_name="batch").scope():
            backbone = GemmaBackbone.from_preset(FIXTURES / name)
        inputs = reference_inputs(name)
        hidden = backbone.make_forward_fn()(inputs["token_ids"], inputs["padding_mask"])[0]
    finally:
        keras.distribution.set_distribution(None)
    ref = reference(name)
    real = ref["padding_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref["hidden_states"][real],
                               atol=1e-4, rtol=0)


def test_backbone_blocked_equals_dense_with_window_and_cap(monkeypatch):
    backbone = gemma2_like()
    ids, padding = token_batch()
    dense = np.asarray(backbone.make_forward_fn()(ids, padding)[0])
    monkeypatch.setattr(dot_product_attention, "BLOCK_SIZE", BLOCK)
    blocked = np.asarray(backbone.make_forward_fn()(ids, padding)[0])
    real = padding.astype(bool)
    np.testing.assert_allclose(blocked[real], dense[real], atol=1e-5, rtol=0)


def test_lora_training_steps_equal_through_blocked_path(monkeypatch):
    """Fine-tuning differentiates the LoRA factors through the scans: the
    same steps from the same start give the same losses as the plain path."""
    backbone = gemma2_like()
    ids, padding = token_batch()
    config = FineTuneConfig(rank=4, learning_rate=3e-2, steps=3, batch_size=3, sequence_length=37)

    def losses():
        trainer = LoraTrainer(backbone, config)
        return [trainer.step(ids, padding) for _ in range(3)]

    dense = losses()
    monkeypatch.setattr(dot_product_attention, "BLOCK_SIZE", BLOCK)
    blocked = losses()
    assert dense[2] < dense[0]  # the steps do train
    np.testing.assert_allclose(blocked, dense, atol=1e-5, rtol=0)


def compiled_temp_bytes(backbone, length):
    fn = jax.jit(lambda values, ids, mask: backbone.stateless_hidden_states(
        values, {"token_ids": ids, "padding_mask": mask}))
    ids = jax.ShapeDtypeStruct((1, length), "int32")
    memory = fn.lower([v.value for v in backbone.variables], ids, ids).compile().memory_analysis()
    return getattr(memory, "temp_size_in_bytes", None)


def test_activation_memory_grows_linearly_with_length():
    """Doubling one sequence from 4096 to 8192 tokens (both blocked) less
    than 2.5x the compiled temporaries; the plain attention would quadruple
    them. (At this tiny width the O(T) activations outweigh the attention
    tiles, and below 4096 tokens XLA's buffer packing makes the ratio jump
    about.)"""
    backbone = gemma2_like(sliding_window_size=512)
    assert dot_product_attention.BLOCK_SIZE < 4096
    short, long = compiled_temp_bytes(backbone, 4096), compiled_temp_bytes(backbone, 8192)
    if short is None:
        pytest.skip("this backend reports no memory analysis")
    assert long < 2.5 * short, (short, long)
    # And far below the plain path's (1, heads, T, T) float32 scores alone.
    assert long < TINY_CONFIG["num_query_heads"] * 8192 ** 2 * 4 / 16, long
