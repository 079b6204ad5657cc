"""On a CUDA GPU: the worker's backbone, sharded by its layout map over the
GPUs, gives the reference outputs, in float32 and with adapters.

Selected only when JAX_PLATFORMS names cuda (`make test-gpu`); the CPU run
deselects them (they are not counted there).
"""

import jax
import numpy as np
import pytest

from fixture_support import FIXTURES, reference, reference_inputs
from gemma_core import GemmaBackbone, LoraAdapter
from worker.sharded_backbone import ShardedBackbone
from worker.worker_config import WorkerSpec

pytestmark = pytest.mark.gpu

FLOAT32_FIXTURES = ["gemma1_tiny", "gemma2_tiny", "gemma2_tiny_sharded",
                    "hf_gemma_tiny", "hf_gemma2_tiny"]


def on_gpus(model):
    """Every weight's shards live on the model's GPUs, and those are GPUs."""
    assert {d.platform for d in model.devices} == {"gpu"}, model.devices
    for variable in model.backbone.variables:
        assert variable.value.sharding.device_set <= set(model.devices), variable.path


def all_layers(model):
    return np.arange(model.backbone.num_layers + 1, dtype="int32")


@pytest.mark.parametrize("name", FLOAT32_FIXTURES)
def test_float32_fixture_matches_reference_sharded_on_the_gpu(name):
    ref = reference(name)
    model = ShardedBackbone(WorkerSpec(str(FIXTURES / name), mesh_shape=(1, 1)))
    on_gpus(model)
    inputs = reference_inputs(name)
    rows = len(inputs["token_ids"])
    states = model.run(inputs["token_ids"], inputs["padding_mask"], all_layers(model),
                       np.zeros(rows, "int32"))                 # (L+1, B, T, d)
    valid = ref["padding_mask"].astype(bool)
    assert states.dtype == np.float32
    np.testing.assert_allclose(states[-1][valid], ref["hidden_states"][valid],
                               atol=1e-4, rtol=0)
    logits = np.asarray(model.backbone.logits(states[-1]))
    np.testing.assert_allclose(logits[valid], ref["logits"][valid], atol=1e-4, rtol=0)


def test_float32_stays_float32_inside_a_lower_precision_scope():
    """The model's own precision wins over a caller's TF32/bf16 default:
    without it, float32 dots on the GPU run in TF32 (~1e-3 off)."""
    ref = reference("gemma2_tiny")
    backbone = GemmaBackbone.from_preset(FIXTURES / "gemma2_tiny")
    with jax.default_matmul_precision("bfloat16"):
        hidden = np.asarray(backbone(reference_inputs("gemma2_tiny")))
    valid = ref["padding_mask"].astype(bool)
    np.testing.assert_allclose(hidden[valid], ref["hidden_states"][valid], atol=1e-4, rtol=0)


def test_bfloat16_fixture_on_the_gpu_stays_bfloat16_and_close():
    ref = reference("gemma1_tiny_bf16")
    model = ShardedBackbone(WorkerSpec(str(FIXTURES / "gemma1_tiny_bf16"), mesh_shape=(1, 1)))
    on_gpus(model)
    assert all(v.dtype == "bfloat16" for v in model.backbone.weights)
    inputs = reference_inputs("gemma1_tiny_bf16")
    states = model.run(inputs["token_ids"], inputs["padding_mask"],
                       np.array([model.backbone.num_layers], "int32"),
                       np.zeros(len(inputs["token_ids"]), "int32"))
    assert str(states.dtype) == "bfloat16"
    valid = ref["padding_mask"].astype(bool)
    got = states[0].astype("float32")[valid]
    want = ref["hidden_states"].astype("float32")[valid]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2


def test_mixed_adapter_batch_on_the_gpu_matches_merged_models():
    gpus = len(jax.devices("gpu"))
    model = ShardedBackbone(WorkerSpec("default", mesh_shape=(1, gpus), max_adapters=2,
                                       max_adapter_rank=4))
    on_gpus(model)
    plain = model.backbone
    adapter = LoraAdapter.random(plain.config, rank=3, alpha=6.0, seed=1)
    model.write_slot(1, adapter)
    merged = GemmaBackbone.from_config(plain.get_config())
    merged.set_weights(plain.get_weights())
    adapter.apply_to(merged)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, plain.vocabulary_size, (4, 24)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    slots = np.array([1, 0, 1, 0], "int32")
    got = model.run(ids, mask, np.array([plain.num_layers], "int32"), slots)[0]
    for row, slot in enumerate(slots):
        reference_model = merged if slot else plain
        want = np.asarray(reference_model({"token_ids": ids[row:row + 1],
                                           "padding_mask": mask[row:row + 1]}))[0]
        keep = mask[row].astype(bool)
        np.testing.assert_allclose(got[row][keep], want[keep], atol=1e-4)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the adapter changed its rows
