"""The worker's sharded model in-process: rows split over the data axis,
adapter slots written and read, all equal to the plain backbone."""

import collections

import numpy as np
import pytest

from gemma_core import GemmaBackbone, LoraAdapter
from gemma_core.memory_plan import plan_memory
from worker.sharded_backbone import ShardedBackbone
from worker.worker_config import WorkerSpec


@pytest.fixture(scope="module")
def plain():
    return GemmaBackbone.from_preset("default")


@pytest.mark.parametrize("mesh", [(2, 2), (4, 1)])
def test_rows_over_the_data_axis_and_slots_match_the_plain_model(plain, mesh):
    model = ShardedBackbone(WorkerSpec("default", mesh_shape=mesh, max_adapters=2,
                                       max_adapter_rank=4))
    adapter = LoraAdapter.random(plain.config, rank=3, alpha=6.0, seed=1)
    model.write_slot(2, adapter)
    # The slot tables stay split over the mesh after a write, as planned.
    per_device = collections.Counter()
    for table in model.lora_tables.values():
        for shard in table.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    plan = plan_memory(plain.config, mesh, max_adapters=2, max_adapter_rank=4)
    assert set(per_device.values()) == {plan.adapter_table_bytes}
    with_adapter = GemmaBackbone.from_config(plain.get_config())
    with_adapter.set_weights(plain.get_weights())
    adapter.apply_to(with_adapter)
    rng = np.random.default_rng(0)
    layers = np.array([0, plain.num_layers], "int32")
    for rows in (4, 3):  # divisible by the data axis, and not
        ids = rng.integers(0, plain.vocabulary_size, (rows, 16)).astype("int32")
        mask = np.ones_like(ids)
        mask[0, 12:] = 0
        slots = np.array([2, 0, 2, 0][:rows], "int32")
        got = model.run(ids, mask, layers, slots)                    # (2, rows, 16, d)
        for row in range(rows):
            reference = with_adapter if slots[row] else plain
            want = reference.hidden_states({"token_ids": ids[row:row + 1],
                                            "padding_mask": mask[row:row + 1]},
                                           layers=[0, -1])
            valid = mask[row].astype(bool)
            for k in range(2):
                np.testing.assert_allclose(got[k, row][valid], np.asarray(want[k])[0][valid],
                                           atol=1e-5)
    model.write_slot(2, None)  # unloaded: the slot is the base model again
    np.testing.assert_allclose(model.run(ids, mask, layers, np.full(rows, 2, "int32")),
                               model.run(ids, mask, layers, np.zeros(rows, "int32")),
                               atol=1e-6)
