"""What the forward pass honours: layer outputs, masks, flags, dtypes, jit."""

import keras
import numpy as np
import pytest

from fixture_support import TINY_CONFIG
from gemma_core import GemmaBackbone
from gemma_core.rms_normalization import RMSNormalization


def np_(x):
    return np.asarray(x, dtype="float32")


def test_layer_indices_follow_hugging_face_convention(tiny_backbone, tiny_inputs):
    L = TINY_CONFIG["num_layers"]
    embedding, after_first, final, final_again = tiny_backbone.hidden_states(
        tiny_inputs, layers=[0, 1, L, -1])
    table = np_(tiny_backbone.token_embedding.embeddings)
    scale = np.float32(np.sqrt(TINY_CONFIG["hidden_dim"]))
    np.testing.assert_allclose(np_(embedding), table[tiny_inputs["token_ids"]] * scale, rtol=1e-6)
    block = tiny_backbone.transformer_layers[0]
    np.testing.assert_allclose(
        np_(after_first), np_(block(embedding, padding_mask=tiny_inputs["padding_mask"])),
        atol=1e-6)
    np.testing.assert_array_equal(np_(final), np_(final_again))
    np.testing.assert_allclose(np_(final), np_(tiny_backbone(tiny_inputs)), atol=1e-6)


def test_logits_are_tied_and_soft_capped(tiny_inputs):
    backbone = GemmaBackbone(**TINY_CONFIG, final_logit_soft_cap=3.0)
    hidden = np_(backbone(tiny_inputs))
    table = np_(backbone.token_embedding.embeddings)
    expected = np.tanh(hidden @ table.T / 3.0) * 3.0
    logits = np_(backbone.logits(hidden))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.abs(logits).max() <= 3.0


def test_causal_and_padding_masks(tiny_backbone, tiny_inputs):
    base = np_(tiny_backbone(tiny_inputs))
    later = {k: v.copy() for k, v in tiny_inputs.items()}
    later["token_ids"][0, 8] = (later["token_ids"][0, 8] + 1) % 256
    changed = np_(tiny_backbone(later))
    np.testing.assert_allclose(changed[0, :8], base[0, :8], atol=1e-6)  # past unaffected
    assert np.abs(changed[0, 8:] - base[0, 8:]).max() > 1e-4
    padded = {k: v.copy() for k, v in tiny_inputs.items()}
    padded["token_ids"][1, 10] = (padded["token_ids"][1, 10] + 7) % 256  # a pad position
    np.testing.assert_allclose(np_(tiny_backbone(padded))[1, :9], base[1, :9], atol=1e-6)


@pytest.mark.parametrize("windowed", [True, False])
def test_sliding_window_on_even_layers(tiny_inputs, windowed):
    backbone = GemmaBackbone(**TINY_CONFIG, use_sliding_window_attention=windowed,
                             sliding_window_size=2)
    changed = {k: v.copy() for k, v in tiny_inputs.items()}
    changed["token_ids"][0, 0] = (changed["token_ids"][0, 0] + 1) % 256
    # Index 1 = after block 0 (even, so windowed): position 5 sees tokens 4..5.
    before = np_(backbone.hidden_states(tiny_inputs, layers=[1])[0])
    after = np_(backbone.hidden_states(changed, layers=[1])[0])
    differs = np.abs(after[0, 5] - before[0, 5]).max() > 1e-6
    assert differs != windowed
    assert np.abs(after[0, 1] - before[0, 1]).max() > 1e-6  # inside the window
    # Block 1 (odd) is global: the change reaches position 5 again.
    before, after = (np_(backbone.hidden_states(x, layers=[2])[0]) for x in (tiny_inputs, changed))
    assert np.abs(after[0, 5] - before[0, 5]).max() > 1e-6


def test_query_head_dim_normalize_is_honoured(tiny_inputs):
    # hidden 64 / 4 heads = 16 = head_dim would hide the flag: use head_dim 8.
    config = dict(TINY_CONFIG, head_dim=8)
    on = GemmaBackbone(**config, query_head_dim_normalize=True)
    off = GemmaBackbone(**config, query_head_dim_normalize=False)
    off.set_weights(on.get_weights())
    assert on.transformer_layers[0].attention.query_scale == pytest.approx(1 / np.sqrt(8))
    assert off.transformer_layers[0].attention.query_scale == pytest.approx(1 / np.sqrt(16))
    assert np.abs(np_(on(tiny_inputs)) - np_(off(tiny_inputs))).max() > 1e-4


def test_layer_norm_epsilon_reaches_every_norm(tiny_inputs):
    backbone = GemmaBackbone(**TINY_CONFIG, use_post_ffw_norm=True,
                             use_post_attention_norm=True, layer_norm_epsilon=0.5)
    norms = [layer for layer in backbone._flatten_layers() if isinstance(layer, RMSNormalization)]
    assert len(norms) == 4 * TINY_CONFIG["num_layers"] + 1
    assert all(norm.epsilon == 0.5 for norm in norms)
    default = GemmaBackbone(**TINY_CONFIG, use_post_ffw_norm=True, use_post_attention_norm=True)
    default.set_weights(backbone.get_weights())
    assert np.abs(np_(default(tiny_inputs)) - np_(backbone(tiny_inputs))).max() > 1e-3


def test_rms_norm_computes_in_float32_under_bf16():
    norm = RMSNormalization(1e-6, dtype="bfloat16")
    rng = np.random.default_rng(0)
    x = keras.ops.cast(rng.normal(0, 3, (4, 512)).astype("float32"), "bfloat16")
    norm.build(x.shape)
    norm.scale.assign(rng.normal(0, 0.5, (512,)).astype("float32"))
    x32 = np_(x)
    scale32 = np_(keras.ops.cast(norm.scale, "float32"))
    expected = x32 / np.sqrt(np.mean(x32**2, -1, keepdims=True) + 1e-6) * (1 + scale32)
    out = norm(x)
    assert str(out.dtype) == "bfloat16"
    # float32 math then one rounding: within half a bf16 ulp of the exact value.
    np.testing.assert_allclose(np_(out), expected, rtol=2**-8)


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_reduced_precision_policies_track_float32(tiny_backbone, tiny_inputs, policy):
    reduced = GemmaBackbone(**TINY_CONFIG, dtype=policy)
    reduced.set_weights(tiny_backbone.get_weights())
    variable_dtype = "float32" if policy == "mixed_bfloat16" else "bfloat16"
    assert all(v.dtype == variable_dtype for v in reduced.weights)
    out = reduced(tiny_inputs)
    assert str(out.dtype) == "bfloat16"
    expected = np_(tiny_backbone(tiny_inputs))
    assert np.linalg.norm(np_(out) - expected) / np.linalg.norm(expected) < 3e-2


def test_dropout_only_in_training(tiny_inputs):
    backbone = GemmaBackbone(**TINY_CONFIG, dropout=0.5)
    a, b = np_(backbone(tiny_inputs)), np_(backbone(tiny_inputs))
    np.testing.assert_array_equal(a, b)
    trained = np_(backbone(tiny_inputs, training=True))
    assert np.abs(trained - a).max() > 1e-3


def test_jitted_forward_compiles_once_per_shape(tiny_backbone, tiny_inputs):
    forward = tiny_backbone.make_forward_fn(layers=[1, -1])
    ids, mask = tiny_inputs["token_ids"], tiny_inputs["padding_mask"]
    first = forward(ids, mask)
    for _ in range(3):
        again = forward(ids, mask)
    assert forward.num_compilations() == 1
    np.testing.assert_array_equal(np_(first[1]), np_(again[1]))
    np.testing.assert_allclose(np_(first[1]), np_(tiny_backbone(tiny_inputs)), atol=1e-5)
    forward(ids[:, :8], mask[:, :8])
    assert forward.num_compilations() == 2
    # New weight values are read at each call without recompiling.
    norm = tiny_backbone.layer_norm.scale
    norm.assign(np.full(norm.shape, 1.0, "float32"))
    np.testing.assert_allclose(np_(forward(ids, mask)[1]), 2 * np_(first[1]), rtol=1e-5)
    assert forward.num_compilations() == 2


def test_selected_hidden_states_with_layer_ids_as_data(tiny_backbone, tiny_inputs):
    expected = tiny_backbone.hidden_states(tiny_inputs, layers=[2, 0, 1])
    got = tiny_backbone.selected_hidden_states(
        tiny_inputs["token_ids"], tiny_inputs["padding_mask"], np.array([2, 0, 1, 1], "int32"))
    assert got.shape == (4, 2, 12, TINY_CONFIG["hidden_dim"])
    for k, want in enumerate(expected + [expected[2]]):
        np.testing.assert_allclose(np_(got[k]), np_(want), atol=1e-6)
