"""Every built-in preset: exact size (built shape-only) and a valid layout."""

import functools

import jax
import keras
import numpy as np
import pytest

from gemma_core import GEMMA_PRESETS, GemmaBackbone

# From docs/model.md, written out independently of gemma_presets.py.
EXPECTED_PARAMS = {
    **dict.fromkeys(["gemma_2b_en", "gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en",
                     "code_gemma_2b_en", "code_gemma_1.1_2b_en"], 2_506_172_416),
    **dict.fromkeys(["gemma_7b_en", "gemma_instruct_7b_en", "gemma_1.1_instruct_7b_en",
                     "code_gemma_7b_en", "code_gemma_instruct_7b_en",
                     "code_gemma_1.1_instruct_7b_en"], 8_537_680_896),
    **dict.fromkeys(["gemma2_2b_en", "gemma2_instruct_2b_en", "shieldgemma_2b_en"],
                    2_614_341_888),
    **dict.fromkeys(["gemma2_9b_en", "gemma2_instruct_9b_en", "shieldgemma_9b_en"],
                    9_241_705_984),
    **dict.fromkeys(["gemma2_27b_en", "gemma2_instruct_27b_en", "shieldgemma_27b_en"],
                    27_227_128_320),
}
MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (1, 16)]


def test_preset_table_is_complete():
    assert set(GEMMA_PRESETS) == set(EXPECTED_PARAMS)
    for name, preset in GEMMA_PRESETS.items():
        assert preset["metadata"]["description"]
        assert preset["metadata"]["params"] == EXPECTED_PARAMS[name]
        assert preset["kaggle_handle"].startswith("kaggle://")
        assert f"/{name}/" in preset["kaggle_handle"]
    assert GemmaBackbone.presets is GEMMA_PRESETS


@functools.lru_cache(maxsize=None)
def abstract_backbone(name):
    """The full-size model with no memory behind its variables."""
    with keras.StatelessScope(initialize_variables=False):
        return GemmaBackbone(**GEMMA_PRESETS[name]["config"].to_kwargs(), dtype="bfloat16")


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_shape_only_build_has_exact_parameter_count(name):
    backbone = abstract_backbone(name)
    assert backbone.count_params() == EXPECTED_PARAMS[name]
    assert GEMMA_PRESETS[name]["config"].num_parameters() == EXPECTED_PARAMS[name]
    values = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in backbone.variables]
    ids = jax.ShapeDtypeStruct((2, 32), "int32")
    first, last = jax.eval_shape(
        lambda vals, i, m: backbone.stateless_hidden_states(
            vals, {"token_ids": i, "padding_mask": m}, layers=(1, -1)),
        values, ids, ids)
    assert first.shape == last.shape == (2, 32, backbone.hidden_dim)


def mesh_of(shape):
    # Layout maps only need the mesh's shape and names, so placeholders stand
    # in for 16 devices this machine does not have.
    return keras.distribution.DeviceMesh(
        shape, ["batch", "model"], devices=np.arange(np.prod(shape)).reshape(shape))


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_layout_map_divides_every_weight(name, mesh_shape):
    backbone = abstract_backbone(name)
    axis_size = dict(zip(["batch", "model"], mesh_shape))
    for layout_map in (GemmaBackbone.get_layout_map(mesh_of(mesh_shape), config=name),
                       GemmaBackbone.get_layout_map(mesh_of(mesh_shape))):
        sharded_on_model = 0
        for variable in backbone.weights:
            layout = layout_map[variable.path]
            assert layout is not None, f"{variable.path} has no layout"
            assert len(layout.axes) == len(variable.shape)
            for axis, dim in zip(layout.axes, variable.shape):
                if axis is not None:
                    assert dim % axis_size[axis] == 0, (variable.path, layout.axes)
            sharded_on_model += "model" in layout.axes
        if mesh_shape[1] > 1:  # Not a map that merely replicates everything.
            assert sharded_on_model >= 3 * backbone.num_layers + 1


def test_single_kv_head_is_replicated_where_keras_hub_crashes():
    layout_map = GemmaBackbone.get_layout_map(mesh_of((1, 4)), config="gemma_2b_en")
    assert layout_map["decoder_block_0/attention/key/kernel"].axes == (None, "batch", None)
    assert layout_map["decoder_block_0/attention/query/kernel"].axes == ("model", "batch", None)
    # gemma2_9b_en has 8 key/value heads: those do split four ways.
    layout_map = GemmaBackbone.get_layout_map(mesh_of((1, 4)), config="gemma2_9b_en")
    assert layout_map["decoder_block_0/attention/key/kernel"].axes == ("model", "batch", None)


def test_lora_weights_have_layouts():
    layout_map = GemmaBackbone.get_layout_map(mesh_of((2, 4)), config="gemma2_9b_en")
    assert layout_map["decoder_block_7/attention/query/lora_kernel_a"].axes == (
        "model", "batch", None)
    assert layout_map["decoder_block_7/attention/value/lora_kernel_b"].axes == (None, None)
