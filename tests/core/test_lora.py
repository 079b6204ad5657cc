"""enable_lora: only query/value LoRA kernels train, and they change outputs."""

import numpy as np
import pytest

from fixture_support import FIXTURES, TINY_CONFIG, reference_inputs
from gemma_core import GemmaBackbone, PresetError


def test_only_lora_kernels_are_trainable(tiny_backbone):
    assert len(tiny_backbone.trainable_weights) == len(tiny_backbone.weights)
    tiny_backbone.enable_lora(4)
    paths = sorted(v.path for v in tiny_backbone.trainable_weights)
    expected = sorted(f"decoder_block_{i}/attention/{t}/lora_kernel_{ab}"
                      for i in range(TINY_CONFIG["num_layers"])
                      for t in ("query", "value") for ab in "ab")
    assert paths == expected
    shapes = {v.path: tuple(v.shape) for v in tiny_backbone.trainable_weights}
    assert shapes["decoder_block_0/attention/query/lora_kernel_a"] == (4, 64, 4)
    assert shapes["decoder_block_0/attention/value/lora_kernel_a"] == (1, 64, 4)
    assert shapes["decoder_block_0/attention/value/lora_kernel_b"] == (4, 16)


def test_fresh_lora_is_identity_then_b_changes_output(tiny_backbone, tiny_inputs):
    before = np.asarray(tiny_backbone(tiny_inputs))
    tiny_backbone.enable_lora(2)
    np.testing.assert_array_equal(np.asarray(tiny_backbone(tiny_inputs)), before)  # b == 0
    layer = tiny_backbone.transformer_layers[0].attention.value
    layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, "float32"))
    assert np.abs(np.asarray(tiny_backbone(tiny_inputs)) - before).max() > 1e-3


def test_lora_effective_kernel_formula(tiny_backbone, tiny_inputs):
    """kernel + (alpha / r) * a @ b, alpha = r: merging by hand agrees."""
    merged = GemmaBackbone(**TINY_CONFIG)
    merged.set_weights(tiny_backbone.get_weights())
    tiny_backbone.enable_lora(3)
    rng = np.random.default_rng(0)
    for v in tiny_backbone.trainable_weights:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    for block, merged_block in zip(tiny_backbone.transformer_layers, merged.transformer_layers):
        for target in ("query", "value"):
            layer = getattr(block.attention, target)
            a, b = np.asarray(layer.lora_kernel_a.value), np.asarray(layer.lora_kernel_b.value)
            kernel = getattr(merged_block.attention, target).kernel
            kernel.assign(np.asarray(kernel.value) + np.einsum("ndr,rh->ndh", a, b))
    np.testing.assert_allclose(np.asarray(tiny_backbone(tiny_inputs)),
                               np.asarray(merged(tiny_inputs)), atol=1e-5)


def test_lora_errors(tmp_path, tiny_backbone):
    with pytest.raises(ValueError, match="not enabled"):
        tiny_backbone.save_lora_weights(tmp_path / "x.lora.h5")
    with pytest.raises(ValueError, match="positive integer"):
        tiny_backbone.enable_lora(0)
    tiny_backbone.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        tiny_backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"\.lora\.h5"):
        tiny_backbone.save_lora_weights(tmp_path / "x.h5")
    with pytest.raises(PresetError, match="rank 4 but this model has rank 2"):
        tiny_backbone.load_lora_weights(FIXTURES / "gemma1_tiny" / "adapter.lora.h5")


def test_lora_file_for_another_architecture_is_refused():
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma2_tiny")  # 3 layers, post norms
    with pytest.raises(PresetError, match="another architecture"):
        backbone.load_lora_weights(FIXTURES / "gemma1_tiny" / "adapter.lora.h5")


def test_not_a_lora_file(tmp_path):
    bad = tmp_path / "bad.lora.h5"
    bad.write_bytes(b"not h5 at all")
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    with pytest.raises(PresetError, match="not a readable h5"):
        backbone.load_lora_weights(bad)
    assert np.isfinite(np.asarray(backbone(reference_inputs("gemma1_tiny")))).all()
