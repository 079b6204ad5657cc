"""Save and load: our presets, keras_hub's loader, configs, LoRA files."""

import keras
import keras_hub
import numpy as np
import pytest

from fixture_support import FIXTURES, TINY_CONFIG, reference, reference_inputs
from gemma_core import Backbone, GemmaBackbone


def outputs(backbone, name="gemma1_tiny"):
    return np.asarray(backbone(reference_inputs(name)), dtype="float32")


@pytest.mark.parametrize("name", ["gemma1_tiny", "gemma2_tiny", "hf_gemma2_tiny",
                                  "gemma1_tiny_bf16"])
@pytest.mark.parametrize("max_shard_size", [None, 0.0001])
def test_save_then_load_gives_identical_outputs(tmp_path, name, max_shard_size):
    original = GemmaBackbone.from_preset(FIXTURES / name)
    original.save_to_preset(tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "model.weights.json").exists()
    assert sharded == (max_shard_size is not None)
    if sharded:
        assert len(list(tmp_path.glob("model_*.weights.h5"))) > 1
    reloaded = Backbone.from_preset(tmp_path)
    assert reloaded.get_config() == original.get_config()
    for a, b in zip(original.weights, reloaded.weights):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    np.testing.assert_array_equal(outputs(reloaded, name), outputs(original, name))


@pytest.mark.parametrize("max_shard_size", [None, 0.0001])
def test_keras_hub_loads_what_we_save(tmp_path, max_shard_size):
    """Our Hugging Face import, saved as a preset, loads in keras_hub itself
    and gives the transformers reference outputs there."""
    ours = GemmaBackbone.from_preset(FIXTURES / "hf_gemma_tiny")
    ours.save_to_preset(tmp_path, max_shard_size=max_shard_size)
    theirs = keras_hub.models.Backbone.from_preset(str(tmp_path))
    assert type(theirs).__name__ == "GemmaBackbone"
    ref = reference("hf_gemma_tiny")
    valid = ref["padding_mask"].astype(bool)
    hidden = np.asarray(theirs(reference_inputs("hf_gemma_tiny")))
    np.testing.assert_allclose(hidden[valid], ref["hidden_states"][valid], atol=1e-4, rtol=0)


def test_get_config_from_config_round_trip():
    config = dict(TINY_CONFIG, query_head_dim_normalize=False, use_post_ffw_norm=True,
                  use_post_attention_norm=True, attention_logit_soft_cap=2.0,
                  final_logit_soft_cap=5.0, use_sliding_window_attention=True,
                  sliding_window_size=3, layer_norm_epsilon=1e-5, dropout=0.1,
                  dtype="mixed_bfloat16")
    original = GemmaBackbone(**config)
    clone = GemmaBackbone.from_config(original.get_config())
    assert clone.get_config() == original.get_config()
    assert clone.dtype_policy.name == "mixed_bfloat16"
    for key, value in config.items():
        if key != "dtype":
            assert clone.get_config()[key] == value
    clone.set_weights(original.get_weights())
    inputs = reference_inputs("gemma1_tiny")
    np.testing.assert_array_equal(np.asarray(clone(inputs)), np.asarray(original(inputs)))


def test_keras_serialization_round_trip():
    original = GemmaBackbone(**TINY_CONFIG)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(original))
    assert isinstance(restored, GemmaBackbone)
    assert restored.get_config() == original.get_config()


def test_lora_save_load_round_trip(tmp_path):
    inputs = reference_inputs("gemma1_tiny")
    trained = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    trained.enable_lora(3)
    rng = np.random.default_rng(1)
    for variable in trained.trainable_weights:
        variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))
    path = tmp_path / "mine.lora.h5"
    trained.save_lora_weights(path)
    fresh = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    fresh.load_lora_weights(path)
    np.testing.assert_array_equal(outputs(fresh), outputs(trained))
    # keras_hub reads our file and computes the same.
    theirs = keras_hub.models.Backbone.from_preset(str(FIXTURES / "gemma1_tiny"))
    theirs.load_lora_weights(str(path))
    np.testing.assert_allclose(np.asarray(theirs(inputs)), outputs(trained), atol=1e-5)


@pytest.mark.parametrize("post_attention, post_ffw", [(False, True), (True, False),
                                                      (True, True), (False, False)])
def test_lora_files_interchange_with_keras_hub_for_every_post_norm_mix(
        tmp_path, post_attention, post_ffw):
    config = dict(TINY_CONFIG, use_post_attention_norm=post_attention,
                  use_post_ffw_norm=post_ffw)
    keras_hub.models.GemmaBackbone(**config).save_to_preset(str(tmp_path / "base"))
    theirs = keras_hub.models.Backbone.from_preset(str(tmp_path / "base"))
    ours = GemmaBackbone.from_preset(tmp_path / "base")
    theirs.enable_lora(2)
    rng = np.random.default_rng(2)
    for variable in theirs.trainable_weights:
        variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))
    theirs.save_lora_weights(str(tmp_path / "theirs.lora.h5"))
    ours.load_lora_weights(tmp_path / "theirs.lora.h5")
    inputs = reference_inputs("gemma1_tiny")
    np.testing.assert_allclose(outputs(ours), np.asarray(theirs(inputs)), atol=1e-5)
    ours.save_lora_weights(tmp_path / "ours.lora.h5")
    again = keras_hub.models.Backbone.from_preset(str(tmp_path / "base"))
    again.load_lora_weights(str(tmp_path / "ours.lora.h5"))
    np.testing.assert_allclose(np.asarray(again(inputs)), outputs(ours), atol=1e-5)


def test_a_wrong_lora_file_leaves_the_model_untouched(tmp_path):
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma2_tiny")
    with pytest.raises(Exception, match="another architecture"):
        backbone.load_lora_weights(FIXTURES / "gemma1_tiny" / "adapter.lora.h5")
    assert not any("lora" in v.path for v in backbone.weights)
    assert len(backbone.trainable_weights) == len(backbone.weights)
