"""The layout map on 8 real (fake CPU) devices: sharded equals unsharded."""

import jax
import keras
import numpy as np
import pytest

from fixture_support import FIXTURES, reference_inputs
from gemma_core import GemmaBackbone


@pytest.fixture(autouse=True)
def no_distribution_leaks():
    yield
    keras.distribution.set_distribution(None)


def sharded_backbone(name, mesh_shape):
    mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"],
                                         keras.distribution.list_devices())
    unsharded = GemmaBackbone.from_preset(FIXTURES / name, load_weights=False)
    layout_map = GemmaBackbone.get_layout_map(mesh, config=unsharded.get_config())
    distribution = keras.distribution.ModelParallel(layout_map=layout_map,
                                                    batch_dim_name="batch")
    with distribution.scope():
        return GemmaBackbone.from_preset(FIXTURES / name)


def spec_of(variable):
    return tuple(variable.value.sharding.spec)


@pytest.mark.parametrize("name, mesh_shape", [
    ("gemma1_tiny", (2, 4)),     # multi-query: 1 key/value head, model axis 4
    ("gemma1_tiny", (1, 8)),     # 4 query heads on 8: head_dim is split instead
    ("gemma2_tiny", (2, 4)),     # GQA 4/2, window, caps, post norms
])
def test_sharded_forward_equals_unsharded(name, mesh_shape):
    assert len(jax.devices()) == 8
    inputs = reference_inputs(name)
    expected = np.asarray(GemmaBackbone.from_preset(FIXTURES / name)(inputs))
    backbone = sharded_backbone(name, mesh_shape)
    block = backbone.transformer_layers[0]
    # The weights really are spread over the devices.
    assert len(block.ffw_gating.kernel.value.sharding.device_set) == 8
    assert "model" in spec_of(block.ffw_gating.kernel)
    assert "model" in spec_of(block.attention.query.kernel)
    if name == "gemma1_tiny":
        assert "model" not in spec_of(block.attention.key.kernel)
    forward = backbone.make_forward_fn()
    actual = np.asarray(forward(inputs["token_ids"], inputs["padding_mask"])[0])
    valid = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(actual[valid], expected[valid], atol=1e-5, rtol=0)


def test_lora_under_model_parallel_is_sharded_and_correct():
    inputs = reference_inputs("gemma1_tiny")
    lora_file = FIXTURES / "gemma1_tiny" / "adapter.lora.h5"
    plain = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    plain.load_lora_weights(lora_file)
    expected = np.asarray(plain(inputs))
    backbone = sharded_backbone("gemma1_tiny", (2, 4))
    backbone.load_lora_weights(lora_file)
    query = backbone.transformer_layers[1].attention.query
    assert spec_of(query.lora_kernel_a)[0] == "model"
    actual = np.asarray(backbone.make_forward_fn()(inputs["token_ids"], inputs["padding_mask"])[0])
    valid = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(actual[valid], expected[valid], atol=1e-5, rtol=0)
