"""The memory plan: weights exactly as allocated, activations at or above
XLA's own figure, and the `gemma-serve plan` command."""

import collections
import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from worker.worker_config import BatchingConfig
from fixture_support import FIXTURES, TINY_CONFIG
from coordinator import plan_cli
from gemma_core import GEMMA_PRESETS, GemmaBackbone, GemmaConfig, LoraSlotTable
from gemma_core.memory_plan import GIB, _variables, activation_terms, plan_memory

TINY = GemmaConfig(**TINY_CONFIG)


@pytest.fixture(autouse=True)
def no_distribution_leaks():
    yield
    keras.distribution.set_distribution(None)


def real_mesh(shape):
    devices = np.array(jax.devices()[: math.prod(shape)]).reshape(shape)
    return keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)


def sharded_tiny(shape, dtype):
    """The tiny backbone really allocated on `shape` fake CPU devices, the
    way the worker builds it."""
    mesh = real_mesh(shape)
    layout_map = GemmaBackbone.get_layout_map(mesh, config=TINY_CONFIG)
    with keras.distribution.ModelParallel(layout_map=layout_map,
                                          batch_dim_name="batch").scope():
        return mesh, GemmaBackbone(**TINY_CONFIG, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 4)])
def test_planned_weight_bytes_equal_the_bytes_allocated_on_each_device(shape, dtype):
    _, backbone = sharded_tiny(shape, dtype)
    plan = plan_memory(TINY, shape, dtype)
    planned = {w.path: w for w in plan.weights}
    assert set(planned) == {v.path for v in backbone.variables}
    allocated = collections.Counter()
    for variable in backbone.variables:
        for shard in variable.value.addressable_shards:
            allocated[shard.device] += shard.data.nbytes
            # Per variable too, so a mismatch names the weight.
            assert shard.data.shape == planned[variable.path].shard_shape, variable.path
    assert len(allocated) == math.prod(shape)
    assert set(allocated.values()) == {plan.weight_bytes}
    if shape != (1, 1):  # something really is split
        assert plan.weight_bytes < plan.weight_bytes_unsharded


@pytest.mark.parametrize("shape, dtype", [((1, 1), "float32"), ((1, 2), "float32"),
                                          ((2, 4), "float32"), ((2, 4), "bfloat16")])
def test_adapter_table_bytes_equal_the_tables_placed_by_their_partition_specs(shape, dtype):
    mesh = real_mesh(shape)
    # As ShardedBackbone makes it, in the model's compute dtype.
    table = LoraSlotTable(TINY, num_slots=9, max_rank=16, dtype=dtype)
    specs = table.partition_specs(dict(zip(["batch", "model"], shape)))
    tables = {name: jax.device_put(zeros, jax.sharding.NamedSharding(
                  mesh.backend_mesh, jax.sharding.PartitionSpec(*specs[name])))
              for name, zeros in table.zeros().items()}
    per_device = collections.Counter()
    for array in tables.values():
        for shard in array.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    plan = plan_memory(TINY, shape, dtype, max_adapters=8, max_adapter_rank=16)
    assert set(per_device.values()) == {plan.adapter_table_bytes}
    assert plan.adapter_bytes == 2 * plan.adapter_table_bytes
    replicated = sum(t.nbytes for t in table.zeros().values())
    assert (plan.adapter_table_bytes < replicated) == (shape != (1, 1))


def test_adapter_tables_split_like_the_kernels_they_stack():
    # gemma2_27b: 32 query heads and 16 key/value heads split 4 ways, d over 2.
    table = LoraSlotTable(GEMMA_PRESETS["gemma2_27b_en"]["config"],
                          num_slots=9, max_rank=16)
    specs = table.partition_specs({"batch": 2, "model": 4})
    assert specs["query_a"] == (None, None, "model", "batch", None)  # (L, S, N, d, R)
    assert specs["value_a"] == (None, None, "model", "batch", None)  # (L, S, K, d, R)
    assert specs["query_b"] == specs["value_b"] == (None, None, "model", None, None)  # (L, S, N, R, h)
    assert specs["attention_output_a"] == (None, None, "model", None, None)  # (L, S, N, h, R)
    assert specs["attention_output_b"] == (None, None, None, "batch")       # (L, S, R, d)
    assert specs["ffw_gating_a"] == (None, None, "batch", None)             # (L, S, d, R)
    assert specs["ffw_gating_2_b"] == (None, None, None, "model")           # (L, S, R, f)
    assert specs["ffw_linear_a"] == (None, None, "model", None)             # (L, S, f, R)
    assert specs["ffw_linear_b"] == (None, None, None, "batch")             # (L, S, R, d)
    assert specs["ffw_linear_used"] == (None, None)                        # (L, S)
    assert set(specs) == set(table.shapes()) and len(specs) == 21
    one = plan_memory("gemma2_27b_en", (1, 1), max_adapters=8, max_adapter_rank=16)
    split = plan_memory("gemma2_27b_en", (2, 4), max_adapters=8, max_adapter_rank=16)
    assert split.adapter_table_bytes < one.adapter_table_bytes / 5  # 8 devices; R never split
    # One key/value head (gemma_2b_en) cannot be split over the model axis.
    mqa = LoraSlotTable(GEMMA_PRESETS["gemma_2b_en"]["config"], 9, 16)
    assert mqa.partition_specs({"batch": 1, "model": 4})["value_a"][2] is None


@pytest.mark.parametrize("shape, dtype", [((1, 1), "float32"), ((1, 2), "bfloat16"),
                                          ((2, 4), "mixed_bfloat16")])
def test_activation_estimate_is_at_least_what_xla_allocates(shape, dtype):
    rows, length, slots = 4, 256, 4
    mesh, backbone = sharded_tiny(shape, dtype)
    table = LoraSlotTable(backbone.config, 9, 16)
    tables = jax.device_put(table.zeros(), jax.sharding.NamedSharding(
        mesh.backend_mesh, jax.sharding.PartitionSpec()))

    def forward(values, tables, ids, mask, layer_ids, slot_ids):  # ShardedBackbone._forward
        with backbone.bound_to(values):
            return backbone.selected_hidden_states(ids, mask, layer_ids,
                                                   lora=(tables, slot_ids))

    ids = np.zeros((rows, length), "int32")
    compiled = jax.jit(forward).lower(
        [v.value for v in backbone.variables], tables, ids, np.ones_like(ids),
        np.zeros(slots, "int32"), np.zeros(rows, "int32")).compile()
    analysis = compiled.memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    plan = plan_memory(TINY, shape, dtype, rows=rows, length=length, layer_slots=slots)
    # An estimate that errs high, but not absurdly.
    assert xla <= plan.activation_bytes <= 3 * xla, (xla, dict(plan.activations))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_score_program_estimate_is_at_least_what_xla_allocates(dtype):
    """The `scores` term against XLA's own figures for the worker's score
    program (token_scores.scores_at on a forward's output, the final layer's
    slot chosen at run time), on a vocabulary large enough that its block of
    logits is most of it: temporaries and outputs against the term less the
    forward output it reads (an argument to XLA)."""
    from gemma_core import token_scores

    rows, length, slots = 4, 64, 4
    config = GemmaConfig(**{**TINY_CONFIG, "vocabulary_size": 16384})
    backbone = GemmaBackbone(**config.to_kwargs(), dtype=dtype)
    N, M = rows * length, rows * (token_scores.MAX_TOP_K_POSITIONS + 1)

    def scores(values, hidden, final, targets, ranked):  # ShardedBackbone._scores
        with backbone.bound_to(values):
            return token_scores.scores_at(backbone, hidden[final], targets, ranked,
                                          token_scores.MAX_TOP_K)

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, "int32")
    hidden = jax.ShapeDtypeStruct((slots, rows, length, config.hidden_dim),
                                  backbone.compute_dtype)
    compiled = jax.jit(scores).lower(
        [v.value for v in backbone.variables], hidden, ints(),
        (ints(N), ints(N), ints(N), ints()),
        (ints(M), ints(M), ints(M, token_scores.MAX_CANDIDATES), ints())).compile()
    analysis = compiled.memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    terms = activation_terms(config, backbone.compute_dtype, rows, length, layer_slots=slots)
    held = slots * rows * length * config.hidden_dim * jnp.dtype(backbone.compute_dtype).itemsize
    planned = terms["scores"] - held
    assert 3 * 64 * 16384 * 4 < planned  # the logits block dominates
    assert xla <= planned <= 3 * xla, (xla, planned)


def test_activation_terms_follow_the_layout():
    config = GEMMA_PRESETS["gemma2_9b_en"]["config"]

    def terms(mesh, length=1024):
        return activation_terms(config, "bfloat16", rows=16, length=length, mesh_shape=mesh)

    base = terms((1, 1))
    assert base["total"] == max(base["selected"] + base["residual"] + max(
        base["attention"], base["feed_forward"]), base["scores"])
    # A short bucket's largest use is the score program's block of logits
    # over a 256,000-token vocabulary, not its forward.
    short = activation_terms(config, "bfloat16", rows=1, length=32)
    assert short["total"] == short["scores"] > 3 * 32 * 256_000 * 4
    # Scores grow as T x block past the attention block: doubling the
    # length doubles attention (it quadrupled when every score was kept).
    assert 1.9 < terms((1, 1), 2048)["attention"] / base["attention"] < 2.1
    # Query heads split on the model axis divide the scores ...
    assert terms((1, 4))["attention"] < base["attention"] / 3
    # ... the data axis splits the hidden axis, never the rows' scores.
    assert terms((4, 1))["attention"] == base["attention"]
    assert terms((4, 1))["selected"] == base["selected"] // 4


@pytest.mark.parametrize("name", sorted(GEMMA_PRESETS))
def test_every_preset_weights_add_up(name):
    params = GEMMA_PRESETS[name]["config"].num_parameters()
    for dtype, itemsize in (("bfloat16", 2), ("float32", 4), ("mixed_bfloat16", 4)):
        whole = plan_memory(name, (1, 1), dtype)
        assert whole.weight_bytes == whole.weight_bytes_unsharded == params * itemsize
    spread = plan_memory(name, (1, 8), "bfloat16")
    # Replicated parts (norms, a single key/value head) sit on every device.
    assert params * 2 <= spread.weight_bytes * 8 < params * 2 * 1.5
    assert spread.weight_bytes_unsharded == params * 2


def test_a_budget_too_small_is_refused():
    plan = plan_memory("gemma_2b_en", (1, 1), "bfloat16", rows=16, length=1024)
    assert plan.fits(plan.total_bytes) and not plan.fits(plan.total_bytes - 1)
    assert plan.total_bytes > plan.weight_bytes > 4 * GIB


def test_mixed_bfloat16_counts_the_cast_copies():
    mixed = plan_memory("gemma_2b_en", (1, 2), "mixed_bfloat16", rows=1, length=32)
    plain = plan_memory("gemma_2b_en", (1, 2), "bfloat16", rows=1, length=32)
    assert mixed.activations["weight_casts"] == plain.weight_bytes
    assert plain.activations["weight_casts"] == 0


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="mesh_shape"):
        plan_memory(TINY, (1, 0))
    with pytest.raises(ValueError, match="Unknown built-in preset"):
        plan_memory("gemma_3b", (1, 1))


# ---- the command ---------------------------------------------------------------------


def run_plan(capsys, *argv):
    status = plan_cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_prints_the_table_and_fits(capsys):
    status, out, _ = run_plan(capsys, "--preset", "gemma2_9b_en", "--mesh", "1x2",
                              "--dtype", "bfloat16", "--workers", "4",
                              "--devices-per-node", "8")
    assert status == 0
    batching = BatchingConfig()  # the CLI's default batch: gemma-serve's longest bucket, full
    plan = plan_memory("gemma2_9b_en", (1, 2), "bfloat16", length=batching.max_sequence_length,
                       rows=batching.max_batch_tokens // batching.max_sequence_length)
    for label, value in (("weights", plan.weight_bytes), ("adapter slots", plan.adapter_bytes),
                         ("activations", plan.activation_bytes), ("total", plan.total_bytes)):
        line = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert line.split()[-1] == f"{value / GIB:.3f}", line
    assert "budget (80 GiB x 0.75)" in out and "60.000" in out
    assert out.splitlines()[-1].startswith("OK: ")
    assert "REFUSED" not in out


def test_cli_refuses_what_does_not_fit(capsys):
    status, out, _ = run_plan(capsys, "--preset", "gemma2_27b_en", "--dtype", "bfloat16")
    assert status == 1
    assert out.splitlines()[-1].startswith("REFUSED: needs ")
    assert "try --mesh 1x2" in out
    status, out, _ = run_plan(capsys, "--preset", "gemma_2b_en", "--device-memory-gib", "1")
    assert status == 1 and "REFUSED" in out


@pytest.mark.parametrize("argv, reason", [
    (["--mesh", "1x3", "--devices-per-node", "8"], "does not divide the 8 devices"),
    (["--mesh", "2x8", "--devices-per-node", "8"], "must be on one node"),
    (["--mesh", "1x4", "--workers", "3", "--devices-per-node", "8"], "hold 2 such workers"),
])
def test_cli_refuses_meshes_that_cannot_be_placed(capsys, argv, reason):
    status, out, _ = run_plan(capsys, "--preset", "gemma_2b_en", *argv)
    assert status == 1
    assert out.splitlines()[-1].startswith("REFUSED: ") and reason in out


def test_cli_reads_a_preset_directory_without_its_weights(capsys):
    status, out, _ = run_plan(capsys, "--preset", str(FIXTURES / "gemma1_tiny_bf16"))
    assert status == 0
    assert "61,760 parameters, dtype bfloat16 (the preset's)" in out


def test_cli_built_in_name_assumes_float32_unless_told(capsys):
    _, out, _ = run_plan(capsys, "--preset", "gemma_2b_en")
    assert "dtype float32 (assumed" in out


@pytest.mark.parametrize("preset, message", [
    ("hf://google/gemma-2-2b", "does not download"),
    ("gemma_3b_en", "Unknown preset"),
])
def test_cli_unreadable_presets_exit_2(capsys, preset, message):
    status, _, err = run_plan(capsys, "--preset", preset)
    assert status == 2 and message in err


def test_cli_bad_mesh_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(["--mesh", "4"])
    assert exit_info.value.code == 2
    assert "DATAxMODEL" in capsys.readouterr().err


def test_cli_table_prints_one_line_per_preset_and_mesh(capsys):
    status, out, _ = run_plan(capsys, "--preset", "gemma_2b_en,gemma2_27b_en", "--dtype",
                              "bfloat16", "--table", "1x1", "1x2")
    assert status == 0
    rows = {tuple(line.split()[:3]): line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {(name, "bfloat16", mesh) for name in ("gemma_2b_en", "gemma2_27b_en")
                         for mesh in ("1x1", "1x2")}
    defaults = plan_cli.parse_args([])
    plan = plan_memory("gemma2_27b_en", (1, 2), "bfloat16", rows=defaults.batch,
                       length=defaults.length)
    assert rows[("gemma2_27b_en", "bfloat16", "1x2")][3:] == [
        f"{plan.weight_bytes / GIB:.2f}", f"{plan.adapter_bytes / GIB:.2f}",
        f"{plan.activation_bytes / GIB:.2f}", f"{plan.total_bytes / GIB:.2f}", "yes"]
    assert rows[("gemma2_27b_en", "bfloat16", "1x1")][-1] == "NO"


def test_planning_leaves_no_variable_for_keras_to_initialize_later():
    # Keras initializes every variable queued by a non-initializing
    # StatelessScope when the next StatelessScope closes; a planned 27B
    # model left on that queue would be allocated by whoever comes next.
    from keras.src.backend.common import global_state

    def queued():
        return len(global_state.get_global_attribute("uninitialized_variables", []) or [])

    _variables.cache_clear()  # build again, not from the cache
    before = queued()
    plan_memory("gemma2_27b_en", (1, 2), "float32")
    plan_memory(TINY, (1, 1), "bfloat16")
    assert queued() == before
