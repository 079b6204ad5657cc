"""Mixed-adapter batches: each row with its own slot equals that adapter alone."""

import jax
import numpy as np
import pytest

from fixture_support import FIXTURES, TINY_CONFIG, reference, reference_inputs
from gemma_core import (AdapterMismatch, Backbone, GemmaBackbone, GemmaConfig, LoraAdapter,
                        LoraSlotTable)

CONFIG = GemmaConfig(**TINY_CONFIG)


def random_adapter(seed, rank, alpha=None, targets=("query", "value"), blocks=None):
    return LoraAdapter.random(CONFIG, rank, alpha, seed=seed, std=0.3, targets=targets,
                              blocks=blocks)


def with_adapter(base, adapter):
    """A fresh enable_lora model on base's weights, carrying `adapter`."""
    model = GemmaBackbone(**TINY_CONFIG)
    model.set_weights(base.get_weights())
    if adapter is not None:
        adapter.apply_to(model)
    return model


def test_mixed_batch_equals_each_adapter_alone(tiny_backbone, tiny_inputs):
    adapters = [None, random_adapter(1, 4), random_adapter(2, 2, alpha=8.0),
                random_adapter(3, 8, targets=("query",)), random_adapter(4, 1, blocks=[1])]
    table = LoraSlotTable(CONFIG, num_slots=6, max_rank=8)
    tables = table.zeros()
    for slot, adapter in enumerate(adapters[1:], start=1):
        tables = table.write(tables, slot, table.slot_values(adapter))
    rng = np.random.default_rng(5)
    rows = len(adapters) * 2
    ids = rng.integers(0, 256, (rows, 10)).astype("int32")
    mask = np.ones((rows, 10), "int32")
    mask[1::3, 7:] = 0
    slots = np.array([i % len(adapters) for i in range(rows)], "int32")
    layer_ids = np.array([0, 1, 2], "int32")
    mixed = np.asarray(jax.jit(tiny_backbone.selected_hidden_states)(
        ids, mask, layer_ids, lora=(tables, slots)))                     # (3, rows, 10, d)
    for slot, adapter in enumerate(adapters):
        picked = slots == slot
        # Alone: only that adapter's rows, a table holding just it in slot 1.
        alone_tables = table.zeros()
        if adapter is not None:
            alone_tables = table.write(alone_tables, 1, table.slot_values(adapter))
        alone = np.asarray(tiny_backbone.selected_hidden_states(
            ids[picked], mask[picked], layer_ids,
            lora=(alone_tables, np.full(picked.sum(), int(adapter is not None), "int32"))))
        np.testing.assert_allclose(mixed[:, picked], alone, atol=1e-5)
        # And gemma_core's enable_lora model with that adapter.
        reference_model = with_adapter(tiny_backbone, adapter)
        expected = reference_model.hidden_states(
            {"token_ids": ids[picked], "padding_mask": mask[picked]}, layers=[0, 1, 2])
        for k in range(3):
            valid = mask[picked].astype(bool)
            np.testing.assert_allclose(mixed[k, picked][valid], np.asarray(expected[k])[valid],
                                       atol=1e-5)
    # The adapters really differ from the base.
    assert np.abs(mixed[2, slots == 1] - mixed[2, slots == 0]).max() > 1e-2


def test_writing_slots_never_recompiles(tiny_backbone, tiny_inputs):
    table = LoraSlotTable(CONFIG, num_slots=3, max_rank=4)
    forward = jax.jit(tiny_backbone.selected_hidden_states)
    # Its own function: jit caches are per function, shared by other tests.
    write = jax.jit(lambda tables, slot, values: LoraSlotTable.write(tables, slot, values))
    tables = jax.device_put(table.zeros())
    outputs = []
    for step in range(6):
        adapter = random_adapter(10 + step, rank=1 + step % 4)
        tables = write(tables, np.int32(1 + step % 2), table.slot_values(adapter))
        slots = np.array([step % 3, 1], "int32")
        outputs.append(np.asarray(forward(tiny_inputs["token_ids"], tiny_inputs["padding_mask"],
                                          np.array([2], "int32"), lora=(tables, slots))))
    assert forward._cache_size() == 1
    assert write._cache_size() == 1
    assert not np.allclose(outputs[0], outputs[1])


def test_keras_hub_fixture_adapter_reproduces_reference():
    ref = reference("gemma1_tiny")
    backbone = Backbone.from_preset(str(FIXTURES / "gemma1_tiny"))
    adapter = LoraAdapter.from_lora_file(FIXTURES / "gemma1_tiny" / "adapter.lora.h5",
                                         backbone.config)
    table = LoraSlotTable(backbone.config, num_slots=2, max_rank=adapter.rank)
    tables = table.write(table.zeros(), 1, table.slot_values(adapter))
    inputs = reference_inputs("gemma1_tiny")
    rows = inputs["token_ids"].shape[0]
    hidden = np.asarray(backbone.selected_hidden_states(
        inputs["token_ids"], inputs["padding_mask"], np.array([backbone.num_layers], "int32"),
        lora=(tables, np.ones(rows, "int32"))))[0]
    valid = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(hidden[valid], ref["hidden_states_with_lora"][valid], atol=1e-5)


def test_adapter_formats_round_trip(tmp_path):
    adapter = random_adapter(7, 3, alpha=6.0)
    again = LoraAdapter.from_tensors(adapter.tensors(), adapter.metadata())
    for key, (a, b) in adapter.kernels.items():
        np.testing.assert_array_equal(again.kernels[key][0], a)
        np.testing.assert_array_equal(again.kernels[key][1], b)
    # keras_hub files have no alpha: the scale is folded into b.
    path = tmp_path / "x.lora.h5"
    adapter.write_lora_file(path, CONFIG)
    loaded = LoraAdapter.from_lora_file(path, CONFIG)
    assert loaded.alpha == loaded.rank == 3
    for key, (a, b) in adapter.kernels.items():
        np.testing.assert_allclose(loaded.kernels[key][1] * loaded.scale, b * adapter.scale,
                                   rtol=1e-6)


def test_adapter_for_another_model_is_refused():
    other = GemmaConfig(**{**TINY_CONFIG, "hidden_dim": 32})
    adapter = random_adapter(1, 2)
    with pytest.raises(AdapterMismatch, match="made for another model"):
        adapter.check_fits(other)
    with pytest.raises(AdapterMismatch, match="rank"):
        LoraAdapter(rank=0, alpha=1.0, kernels=adapter.kernels)
    with pytest.raises(ValueError, match="rank 1 at most"):
        LoraSlotTable(CONFIG, num_slots=2, max_rank=1).slot_values(adapter)
    bad = dict(adapter.kernels)
    bad[(0, "query")] = (np.full_like(bad[(0, "query")][0], np.nan), bad[(0, "query")][1])
    with pytest.raises(AdapterMismatch, match="NaN"):
        LoraAdapter(rank=2, alpha=2.0, kernels=bad)


def test_a_partial_adapter_exports_a_file_keras_hub_layout_reads_whole(tiny_backbone, tmp_path,
                                                                      tiny_inputs):
    """keras_hub loads a pair for every query and value layer: the ones a
    partial adapter leaves alone are written as zero updates."""
    adapter = random_adapter(3, 2, targets=("query",), blocks=[1])
    path = tmp_path / "partial.lora.h5"
    adapter.write_lora_file(path, CONFIG)
    full = GemmaBackbone(**TINY_CONFIG)
    full.set_weights(tiny_backbone.get_weights())
    full.load_lora_weights(path)  # every index present, else this raises
    expected = with_adapter(tiny_backbone, adapter)
    np.testing.assert_allclose(np.asarray(full(tiny_inputs)), np.asarray(expected(tiny_inputs)),
                               atol=1e-5)


def test_bfloat16_tables_serve_a_bfloat16_model_like_float32_ones():
    """A bfloat16 worker keeps its slots in bfloat16 (half the memory); the
    updates are still computed in float32, so rows match float32 tables to
    bfloat16's rounding of the factors."""
    model = GemmaBackbone(**{**TINY_CONFIG, "dtype": "bfloat16"})
    adapter = random_adapter(11, 4, targets=("query", "value", "ffw_linear"))
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        table = LoraSlotTable(CONFIG, num_slots=2, max_rank=4, dtype=dtype)
        tables = table.write(table.zeros(), 1, table.slot_values(adapter))
        assert all(t.dtype == np.dtype(jax.numpy.dtype(dtype)) for t in tables.values())
        ids = np.arange(2, 18, dtype="int32").reshape(2, 8)
        outputs[dtype] = np.asarray(model.selected_hidden_states(
            ids, np.ones_like(ids), np.array([2], "int32"),
            lora=(tables, np.array([1, 0], "int32")))).astype("float32")
    base = outputs["float32"][0, 1]
    np.testing.assert_array_equal(outputs["bfloat16"][0, 1], base)  # the base row
    assert np.abs(outputs["float32"][0, 0] - base).max() > 1e-2     # the adapter matters
    np.testing.assert_allclose(outputs["bfloat16"][0, 0], outputs["float32"][0, 0],
                               atol=0.1, rtol=0.05)
