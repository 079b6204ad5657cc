"""The worker actor's class in-process (no Ray): it runs the batches it is
given, pooled and cast per row, and refuses a batch that reads an adapter
slot its process has not written (a restarted worker before its scheduler
wrote the slots back) rather than run it with empty adapters."""

import os

import numpy as np
import pytest

from gemma_core import GemmaBackbone, LoraAdapter
from service_support import COMPILATION_CACHE_ENV
from worker.backbone_worker import BackboneWorker
from worker.batch import Batch, BatchRow
from worker.errors import SlotsNotWritten
from worker.worker_config import BatchingConfig, WorkerSpec


@pytest.fixture(scope="module")
def worker():
    spec = WorkerSpec("default", max_adapters=2, max_adapter_rank=4,
                      batching=BatchingConfig(length_buckets=(8,), batch_buckets=(1, 2),
                                              max_batch_tokens=16, layer_slots=2),
                      compilation_cache_dir=os.environ.get(COMPILATION_CACHE_ENV))
    return BackboneWorker("worker-test", spec)


def batch(slots, pooling="mean", dtype="float32"):
    ids = np.array([[2, 5, 7, 9, 0, 0, 0, 0], [2, 4, 0, 0, 0, 0, 0, 0]], "int32")
    mask = (ids > 0).astype("int32")
    rows = (BatchRow(4, (1, 0), pooling, dtype), BatchRow(2, (0,), "none", "bfloat16"))
    return Batch(ids, mask, np.array([0, 4], "int32"), np.array(slots, "int32"), rows)


def test_a_batch_reading_an_unwritten_slot_is_refused_until_the_slot_is_written(worker):
    plain = GemmaBackbone.from_preset("default")
    with pytest.raises(SlotsNotWritten, match=r"slots \[1\]"):
        worker.run_batch(batch([1, 0]))
    base = worker.run_batch(batch([0, 0]))
    adapter = LoraAdapter.random(plain.config, rank=2, seed=3)
    worker.write_slot(1, adapter)
    with_adapter = worker.run_batch(batch([1, 0]))
    # Row 0 asked for layers 4 then 0, mean-pooled float32; row 1 layer 0, all
    # tokens, bfloat16: each gets exactly that.
    first, second = with_adapter.tensors
    assert [t.shape for t in first] == [(plain.hidden_dim,)] * 2
    assert first[0].dtype == np.float32 and second[0].dtype.name == "bfloat16"
    assert second[0].shape == (2, plain.hidden_dim)
    want = plain.hidden_states({"token_ids": batch([0, 0]).token_ids[:1, :4],
                                "padding_mask": np.ones((1, 4), "int32")}, layers=[4, 0])
    np.testing.assert_allclose(base.tensors[0][0], np.asarray(want[0])[0].mean(0), atol=1e-5)
    np.testing.assert_allclose(base.tensors[0][1], np.asarray(want[1])[0].mean(0), atol=1e-5)
    assert not np.allclose(with_adapter.tensors[0][0], base.tensors[0][0])  # the adapter's
    np.testing.assert_array_equal(with_adapter.tensors[1][0], base.tensors[1][0])  # base row
    assert with_adapter.device_seconds > 0
    worker.write_slot(1, None)  # unloaded: not readable again
    with pytest.raises(SlotsNotWritten):
        worker.run_batch(batch([1, 0]))
