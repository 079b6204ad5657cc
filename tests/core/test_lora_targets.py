"""LoRA on any of the seven projections in the Keras model: every target and
both factor forms compute kernel + scale * a @ b, and adapters survive
apply_to / from_backbone / PEFT files with ranks and alphas per module."""

import numpy as np
import pytest

from fixture_support import TINY_CONFIG
from gemma_core import AdapterMismatch, GemmaBackbone, GemmaConfig, LoraAdapter
from gemma_core import lora_targets
from gemma_core.lora_targets import KERAS_HUB_FORM, PEFT_FORM, TARGETS

CONFIG = GemmaConfig(**TINY_CONFIG)


def copy_of(base):
    model = GemmaBackbone(**TINY_CONFIG)
    model.set_weights(base.get_weights())
    return model


def merged_by_hand(base, adapter):
    """base's weights with every pair's scaled update added to its kernel."""
    merged = copy_of(base)
    for block, target, layer in merged._lora_layers():
        pair = adapter.kernels.get((block, target))
        if pair is not None:
            scale = adapter.pair_scale((block, target))
            layer.kernel.assign(np.asarray(layer.kernel.value)
                                + scale * lora_targets.update(*pair))
    return merged


def outputs(model, inputs):
    return np.asarray(model(inputs))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("form", [KERAS_HUB_FORM, PEFT_FORM])
def test_factor_forms_rewrite_exactly(target, form):
    a_shape, b_shape = lora_targets.factor_shapes(CONFIG, target, 3, form)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
    kernel_shape = {"query": (4, 64, 16), "key": (1, 64, 16), "value": (1, 64, 16),
                    "attention_output": (4, 16, 64), "ffw_gating": (64, 64),
                    "ffw_gating_2": (64, 64), "ffw_linear": (64, 64)}[target]
    assert lora_targets.update(a, b).shape == kernel_shape
    assert lora_targets.form_of(target, a) == (form if target in ("query", "key", "value")
                                               else KERAS_HUB_FORM)
    if target in ("query", "key", "value"):
        other = lora_targets.to_per_head(a, b) if form == PEFT_FORM \
            else lora_targets.to_shared(a, b)
        heads = lora_targets.heads(CONFIG, target)
        assert other[0].shape[-1] == heads * 3
        np.testing.assert_allclose(lora_targets.update(*other), lora_targets.update(a, b),
                                   atol=1e-12)


def test_enable_lora_on_all_seven_projections(tiny_backbone):
    tiny_backbone.enable_lora(2, ["q_proj", "key", "value", "o_proj", "gate_proj",
                                  "ffw_gating_2", "down_proj"], form=PEFT_FORM)
    shapes = {v.path: tuple(v.shape) for v in tiny_backbone.trainable_weights}
    assert len(shapes) == 2 * 7 * TINY_CONFIG["num_layers"]
    assert shapes["decoder_block_0/attention/query/lora_kernel_a"] == (64, 2)
    assert shapes["decoder_block_0/attention/query/lora_kernel_b"] == (2, 4, 16)
    assert shapes["decoder_block_1/attention/attention_output/lora_kernel_a"] == (4, 16, 2)
    assert shapes["decoder_block_1/ffw_linear/lora_kernel_a"] == (64, 2)
    with pytest.raises(ValueError, match="not a LoRA target"):
        GemmaBackbone(**TINY_CONFIG).enable_lora(2, ["embed_tokens"])
    with pytest.raises(ValueError, match="form"):
        GemmaBackbone(**TINY_CONFIG).enable_lora(2, form="other")


@pytest.mark.parametrize("form", [KERAS_HUB_FORM, PEFT_FORM])
def test_any_subset_applies_as_the_merged_kernels_and_comes_back(tiny_backbone, tiny_inputs,
                                                                   form):
    targets = ("query", "key", "attention_output", "ffw_gating_2", "ffw_linear")
    adapter = LoraAdapter.random(CONFIG, rank=3, alpha=6.0, seed=1, std=0.2, targets=targets,
                                 blocks=[1], form=form)
    model = copy_of(tiny_backbone)
    adapter.apply_to(model)
    expected = outputs(merged_by_hand(tiny_backbone, adapter), tiny_inputs)
    np.testing.assert_allclose(outputs(model, tiny_inputs), expected, atol=2e-5)
    assert np.abs(expected - outputs(tiny_backbone, tiny_inputs)).max() > 1e-2
    # Only the adapter's targets got LoRA, in every block.
    enabled = {(b, t) for b, t, layer in model._lora_layers() if layer.lora_enabled}
    assert enabled == {(b, t) for b in range(2) for t in targets}
    back = LoraAdapter.from_backbone(model)
    assert back.targets == targets
    again = copy_of(tiny_backbone)
    back.apply_to(again)
    np.testing.assert_array_equal(outputs(again, tiny_inputs), outputs(model, tiny_inputs))


def test_ranks_alphas_and_rslora_survive_peft_files(tiny_backbone, tiny_inputs, tmp_path):
    """keras_hub-form query/value become PEFT form at heads x rank (with
    rank_pattern / alpha_pattern entries); per-module ranks and alphas and
    rsLoRA come back from the files as they went in."""
    rng = np.random.default_rng(3)
    shapes = {(0, "query"): (KERAS_HUB_FORM, 2), (1, "query"): (PEFT_FORM, 4),
              (0, "ffw_linear"): (PEFT_FORM, 4), (1, "value"): (KERAS_HUB_FORM, 4)}
    kernels = {key: tuple(rng.normal(0, 0.2, s).astype("float32") for s in
                          lora_targets.factor_shapes(CONFIG, key[1], rank, form))
               for key, (form, rank) in shapes.items()}
    adapter = LoraAdapter(rank=4, alpha=8.0, kernels=kernels, ranks={(0, "query"): 2},
                          alphas={(0, "ffw_linear"): 3.0}, use_rslora=True)
    assert adapter.pair_scale((0, "ffw_linear")) == 3.0 / 2.0
    assert adapter.pair_scale((0, "query")) == 8.0 / np.sqrt(2)
    adapter.write_peft(tmp_path, CONFIG)
    back = LoraAdapter.from_peft(tmp_path, CONFIG)
    assert back.use_rslora and back.rank == 4 and back.alpha == 8.0
    # Query: 4 heads x 2 (block 0); value: 1 head x 4 = r, scale kept by alpha.
    assert back.pair_rank((0, "query")) == 8 and back.pair_rank((1, "value")) == 4
    for key in kernels:
        np.testing.assert_allclose(
            back.pair_scale(key) * lora_targets.update(*back.kernels[key]),
            adapter.pair_scale(key) * lora_targets.update(*kernels[key]), atol=1e-6)
    # Blocks a target leaves out are written as zero updates.
    np.testing.assert_array_equal(back.kernels[(0, "value")][1], 0)
    ours, theirs = copy_of(tiny_backbone), copy_of(tiny_backbone)
    adapter.apply_to(ours)
    back.apply_to(theirs)
    np.testing.assert_allclose(outputs(ours, tiny_inputs), outputs(theirs, tiny_inputs),
                               atol=1e-5)
    np.testing.assert_allclose(outputs(ours, tiny_inputs),
                               outputs(merged_by_hand(tiny_backbone, adapter), tiny_inputs),
                               atol=2e-5)


def test_apply_to_a_backbone_with_other_lora_is_refused(tiny_backbone):
    model = copy_of(tiny_backbone)
    model.enable_lora(2)  # keras_hub's: query and value, per head
    with pytest.raises(AdapterMismatch, match="not on block 0 key"):
        LoraAdapter.random(CONFIG, 2, targets=("key",)).apply_to(model)
    with pytest.raises(AdapterMismatch, match="rank 2 enabled .*rank 3 there"):
        LoraAdapter.random(CONFIG, 3).apply_to(model)
    with pytest.raises(AdapterMismatch, match="peft form"):
        LoraAdapter.random(CONFIG, 2, form=PEFT_FORM).apply_to(model)


def test_malformed_pairs_name_the_pair():
    a, b = lora_targets.factor_shapes(CONFIG, "ffw_linear", 2)
    with pytest.raises(AdapterMismatch, match=r"block 0 ffw_linear: .*rank-3 pair"):
        LoraAdapter(rank=3, alpha=3.0, kernels={(0, "ffw_linear"): (np.zeros(a), np.zeros(b))})
    with pytest.raises(AdapterMismatch, match="ranks"):
        LoraAdapter(rank=2, alpha=2.0, kernels={(0, "ffw_linear"): (np.zeros(a), np.zeros(b))},
                    ranks={(1, "ffw_linear"): 2})
