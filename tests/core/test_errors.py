"""Mistakes a user can make get an error that says what to fix."""

import json
import shutil

import pytest

from fixture_support import FIXTURES, reference_inputs
from gemma_core import Backbone, GemmaBackbone, PresetError, TokenIdError


@pytest.fixture()
def preset_copy(tmp_path):
    target = tmp_path / "preset"
    shutil.copytree(FIXTURES / "gemma1_tiny", target)
    return target


def edit_config(directory, **changes):
    path = directory / "config.json"
    document = json.loads(path.read_text())
    document["config"].update(changes)
    path.write_text(json.dumps(document))


def test_unknown_preset_lists_close_matches():
    with pytest.raises(PresetError, match=r"Unknown preset 'gemma2_2b_eng'.*Did you mean "
                                          r"'gemma2_2b_en'"):
        GemmaBackbone.from_preset("gemma2_2b_eng")


def test_malformed_config_json(preset_copy):
    (preset_copy / "config.json").write_text('{"class_name": "GemmaBackbone", ')
    with pytest.raises(PresetError, match="not valid JSON"):
        GemmaBackbone.from_preset(preset_copy)


def test_config_missing_an_argument(preset_copy):
    path = preset_copy / "config.json"
    document = json.loads(path.read_text())
    del document["config"]["num_layers"]
    path.write_text(json.dumps(document))
    with pytest.raises(PresetError, match="num_layers"):
        GemmaBackbone.from_preset(preset_copy)


def test_config_with_impossible_values(preset_copy):
    edit_config(preset_copy, num_key_value_heads=3)
    with pytest.raises(PresetError, match="num_query_heads must be a multiple of "
                                          "num_key_value_heads"):
        GemmaBackbone.from_preset(preset_copy)


def test_missing_weight_file(preset_copy):
    (preset_copy / "model.weights.h5").unlink()
    with pytest.raises(PresetError, match="No weights in .*load_weights=False"):
        GemmaBackbone.from_preset(preset_copy)
    # The architecture alone still builds.
    assert GemmaBackbone.from_preset(preset_copy, load_weights=False).num_layers == 2


def test_missing_weight_shard(tmp_path):
    shutil.copytree(FIXTURES / "gemma2_tiny_sharded", tmp_path / "p")
    (tmp_path / "p" / "model_00002.weights.h5").unlink()
    with pytest.raises(PresetError, match="model_00002.weights.h5 is missing"):
        GemmaBackbone.from_preset(tmp_path / "p")


def test_shape_mismatch_between_config_and_weights(preset_copy):
    edit_config(preset_copy, head_dim=8)
    with pytest.raises(PresetError, match=r"attention/query/kernel has shape \(4, 64, 16\).*"
                                          r"config asks for \(4, 64, 8\)"):
        GemmaBackbone.from_preset(preset_copy)


def test_fewer_layers_than_the_weights(preset_copy):
    edit_config(preset_copy, num_layers=1)
    with pytest.raises(PresetError, match="no place for"):
        GemmaBackbone.from_preset(preset_copy)


def test_hugging_face_shape_mismatch(tmp_path):
    shutil.copytree(FIXTURES / "hf_gemma2_tiny", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["intermediate_size"] = 40
    path.write_text(json.dumps(config))
    with pytest.raises(PresetError, match="mlp.gate_proj.weight has shape"):
        GemmaBackbone.from_preset(tmp_path / "hf")


def test_unsupported_hugging_face_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PresetError, match="model_type 'llama'"):
        Backbone.from_preset(tmp_path)


def test_a_directory_that_is_no_preset(tmp_path):
    with pytest.raises(PresetError, match="neither a keras_hub preset"):
        Backbone.from_preset(tmp_path)


def test_token_ids_out_of_range():
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    inputs = reference_inputs("gemma1_tiny")
    inputs["token_ids"] = inputs["token_ids"].copy()
    inputs["token_ids"][0, 3] = 256
    with pytest.raises(TokenIdError, match=r"must be in \[0, 256\); got \[256\]"):
        backbone(inputs)
    with pytest.raises(TokenIdError, match="must be in"):
        backbone.hidden_states(inputs)
    with pytest.raises(TokenIdError, match="must be in"):
        backbone.make_forward_fn()(inputs["token_ids"], inputs["padding_mask"])
    inputs["token_ids"][0, 3] = -1
    with pytest.raises(TokenIdError, match=r"got \[-1\]"):
        backbone(inputs)


def test_layer_index_out_of_range():
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma1_tiny")
    with pytest.raises(ValueError, match="Layer index 3 is out of range for a 2-layer model"):
        backbone.hidden_states(reference_inputs("gemma1_tiny"), layers=[3])


def test_subclass_mismatch_is_explained(tmp_path, preset_copy):
    path = preset_copy / "config.json"
    document = json.loads(path.read_text())
    document["registered_name"] = "keras_hub>LlamaBackbone"
    path.write_text(json.dumps(document))
    with pytest.raises(PresetError, match="LlamaBackbone"):
        Backbone.from_preset(preset_copy)
