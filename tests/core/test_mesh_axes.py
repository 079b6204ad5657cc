"""The mesh axis names are written once, data axis first."""

import keras
import numpy as np

import gemma_core
from gemma_core import GemmaBackbone, GemmaConfig, LoraSlotTable
from gemma_core.gemma_layout import choose_placements
from gemma_core.memory_plan import placeholder_mesh
from fixture_support import TINY_CONFIG


def test_mesh_axes_are_data_then_model():
    assert gemma_core.MESH_AXES == ("batch", "model")


def test_the_defaults_name_the_mesh_axes():
    """Layout map, slot tables and memory plan all split over MESH_AXES
    without being told the names."""
    config = GemmaConfig(**TINY_CONFIG)
    data, model = gemma_core.MESH_AXES
    sizes = {data: 2, model: 4}
    assert placeholder_mesh((2, 4)).axis_names == [data, model]
    placements = choose_placements([config], sizes)
    assert placements == choose_placements([config], sizes, model_axis=model, data_axis=data)
    assert model in placements[r".*ffw_gating(_2)?/kernel"]
    table = LoraSlotTable(config, num_slots=2, max_rank=2)
    assert table.partition_specs(sizes) == table.partition_specs(sizes, model, data)
    mesh = keras.distribution.DeviceMesh((2, 4), list(gemma_core.MESH_AXES),
                                         np.arange(8).reshape(2, 4))
    layout = GemmaBackbone.get_layout_map(mesh, config=config)
    assert layout["decoder_block_0/ffw_gating/kernel"].axes == (data, model)
