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


def test_scoring_rows_beside_hidden_rows_compile_nothing_and_match_the_library(plain):
    """A bucket compiled ahead serves a batch mixing scoring rows (with and
    without an adapter) and a hidden-state row without compiling; each
    scoring row equals gemma_core.token_scores on the plain model."""
    from gemma_core import token_scores
    from worker.batch import Batch, BatchRow, row_results
    from worker.score_picks import ScorePicks, ScoreSpec, row_scores
    from worker.worker_config import BatchingConfig

    batching = BatchingConfig(length_buckets=(16,), batch_buckets=(4,), max_batch_tokens=64)
    model = ShardedBackbone(WorkerSpec("default", mesh_shape=(2, 2), max_adapters=1,
                                       max_adapter_rank=4, batching=batching))
    model.compile_buckets(batching.shapes())
    compiled = model.compiled_functions()
    assert compiled == 2 * len(batching.shapes())  # a forward and a score program each
    adapter = LoraAdapter.random(plain.config, rank=3, alpha=6.0, seed=2)
    model.write_slot(1, adapter)
    with_adapter = GemmaBackbone.from_config(plain.get_config())
    with_adapter.set_weights(plain.get_weights())
    adapter.apply_to(with_adapter)

    rng = np.random.default_rng(3)
    lengths = [16, 9, 5]
    ids = np.zeros((4, 16), "int32")
    mask = np.zeros((4, 16), "int32")
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(0, plain.vocabulary_size, length)
        mask[row, :length] = 1
    L = plain.num_layers
    layer_ids = np.array([L, 0, L, L], "int32")   # slot 0: the final output
    specs = (ScoreSpec(token_logprobs=True, top_k=5, positions=(0, 15), candidates=(3, 7, 9)),
             BatchRow(length=9, layers=(1, 0)),
             ScoreSpec(token_logprobs=True, candidates=(4, 1)))
    rows = (BatchRow(length=16, layers=(0,), score=specs[0]), specs[1],
            BatchRow(length=5, layers=(0,), score=specs[2]))
    slots = np.array([1, 0, 0, 0], "int32")
    batch = Batch(ids, mask, layer_ids, slots, rows)
    picks = ScorePicks.of(batch)
    hidden, outputs = model.run_scored(ids, mask, layer_ids, slots, picks, hidden_wanted=True)
    results = row_results(hidden, rows, row_scores(outputs, picks, rows))
    assert model.compiled_functions() == compiled

    for row, reference in ((0, with_adapter), (2, plain)):
        length = lengths[row]
        inputs = {"token_ids": ids[row:row + 1, :length],
                  "padding_mask": mask[row:row + 1, :length]}
        final = reference(inputs)
        got, spec = results[row], rows[row].score
        want = np.asarray(token_scores.token_logprobs(reference, final, inputs["token_ids"]))[0]
        np.testing.assert_allclose(got.token_logprobs, want, atol=1e-5)
        chosen, probs = token_scores.candidates(reference, final, np.array([length - 1]),
                                                np.array([spec.candidates]))
        np.testing.assert_allclose(got.candidate_logprobs, np.asarray(chosen)[0], atol=1e-5)
        np.testing.assert_allclose(got.candidate_probs, np.asarray(probs)[0], atol=1e-5)
        if spec.top_k:
            top_ids, top_lp = token_scores.top_k(reference, final, np.array([spec.positions]),
                                                 spec.top_k)
            np.testing.assert_allclose(got.top_logprobs, np.asarray(top_lp)[0], atol=1e-5)
            np.testing.assert_array_equal(got.top_ids[:, 0], np.asarray(top_ids)[0, :, 0])
        else:
            assert got.top_ids is None
    want_hidden = plain.hidden_states({"token_ids": ids[1:2, :9], "padding_mask": mask[1:2, :9]},
                                      layers=[0, L])  # its layer slots 1 and 0
    for k in range(2):
        np.testing.assert_allclose(results[1][k], np.asarray(want_hidden[k])[0], atol=1e-5)
