"""Outputs equal what keras_hub and transformers computed for each fixture."""

import numpy as np
import pytest

from fixture_support import FIXTURES, reference, reference_inputs
from gemma_core import Backbone, GemmaBackbone

FLOAT32_FIXTURES = ["gemma1_tiny", "gemma2_tiny", "gemma2_tiny_sharded",
                    "hf_gemma_tiny", "hf_gemma2_tiny"]


def valid(array, ref):
    return np.asarray(array, dtype="float32")[ref["padding_mask"].astype(bool)]


@pytest.mark.parametrize("name", FLOAT32_FIXTURES)
def test_float32_hidden_states_and_logits_match_reference(name):
    ref = reference(name)
    backbone = Backbone.from_preset(FIXTURES / name)
    hidden = backbone(reference_inputs(name))
    np.testing.assert_allclose(valid(hidden, ref), valid(ref["hidden_states"], ref),
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(valid(backbone.logits(hidden), ref),
                               valid(ref["logits"], ref), atol=1e-4, rtol=0)


def relative_l2(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def test_bfloat16_fixture_matches_within_bf16_tolerance():
    ref = reference("gemma1_tiny_bf16")
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny_bf16")
    assert backbone.dtype_policy.name == "bfloat16"
    assert all(v.dtype == "bfloat16" for v in backbone.weights)  # bf16 stays bf16
    hidden = backbone(reference_inputs("gemma1_tiny_bf16"))
    assert str(hidden.dtype) == "bfloat16"
    assert relative_l2(valid(hidden, ref), valid(ref["hidden_states"], ref)) < 3e-2
    assert relative_l2(valid(backbone.logits(hidden), ref), valid(ref["logits"], ref)) < 3e-2


def test_keras_hub_lora_file_reproduces_reference():
    ref = reference("gemma1_tiny")
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    backbone.load_lora_weights(FIXTURES / "gemma1_tiny" / "adapter.lora.h5")
    hidden = backbone(reference_inputs("gemma1_tiny"))
    np.testing.assert_allclose(valid(hidden, ref), valid(ref["hidden_states_with_lora"], ref),
                               atol=1e-4, rtol=0)
    # The adapter must matter, or this test would prove nothing.
    assert np.abs(valid(ref["hidden_states_with_lora"], ref)
                  - valid(ref["hidden_states"], ref)).max() > 1e-2



@pytest.mark.parametrize("prefix", ["model.", ""])
def test_sharded_hugging_face_checkpoint_with_or_without_prefix(tmp_path, prefix):
    """Split hf_gemma2_tiny into two safetensors shards plus an index, as
    transformers does for large models, and rename keys."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    source = FIXTURES / "hf_gemma2_tiny"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = {k.removeprefix("model."): v
               for k, v in load_file(source / "model.safetensors").items()}
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({prefix + n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({prefix + n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    ref = reference("hf_gemma2_tiny")
    hidden = GemmaBackbone.from_preset(tmp_path)(reference_inputs("hf_gemma2_tiny"))
    np.testing.assert_allclose(valid(hidden, ref), valid(ref["hidden_states"], ref),
                               atol=1e-4, rtol=0)


def test_bfloat16_hugging_face_checkpoint_stays_bfloat16(tmp_path):
    import json

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    source = FIXTURES / "hf_gemma_tiny"
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.astype(ml_dtypes.bfloat16)
               for k, v in load_file(source / "model.safetensors").items()},
              tmp_path / "model.safetensors")
    backbone = GemmaBackbone.from_preset(tmp_path)
    assert backbone.dtype_policy.name == "bfloat16"
    assert all(v.dtype == "bfloat16" for v in backbone.weights)
    ref = reference("hf_gemma_tiny")
    hidden = backbone(reference_inputs("hf_gemma_tiny"))
    assert relative_l2(valid(hidden, ref), valid(ref["hidden_states"], ref)) < 3e-2
