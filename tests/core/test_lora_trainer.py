"""LoRA fine-tuning: the loss, the steps, and the adapter it hands back."""

import jax
import keras
import numpy as np
import pytest

from fixture_support import TINY_CONFIG
from gemma_core import (AdapterMismatch, FineTuneConfig, GemmaBackbone, GemmaConfig,
                        LoraAdapter, LoraSlotTable, LoraTrainer, TokenIdError, causal_lm_loss,
                        iterate_batches, make_batches, total_steps)

CONFIG = GemmaConfig(**TINY_CONFIG)
QV = ("query", "value")
LAST = np.array([CONFIG.num_layers], "int32")
# A learnable dataset: every sequence cycles through one pattern, from
# different starting points and with different lengths.
PATTERN = np.array([5, 17, 42, 99, 3, 200, 77, 11], "int32")
SEQUENCES = [np.roll(np.tile(PATTERN, 3), -i)[:16 + i % 4] for i in range(8)]
# The tiny model's small random embeddings bound its logits, so even a
# perfect predictor stays well above zero loss; halving it takes ~60 steps.
TRAIN_CONFIG = FineTuneConfig(rank=4, alpha=6.0, learning_rate=3e-2, steps=80, batch_size=8,
                              sequence_length=16)


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    return GemmaBackbone(**TINY_CONFIG)


@pytest.fixture(scope="module")
def trained(backbone):
    """A trainer after a whole run, its losses, and the base weights before."""
    weights_before = [w.copy() for w in backbone.get_weights()]
    trainer = LoraTrainer(backbone, TRAIN_CONFIG)
    losses = [trainer.step(ids, mask) for ids, mask in iterate_batches(SEQUENCES, TRAIN_CONFIG)]
    return trainer, losses, weights_before


def padded_batch(seed=0, rows=4, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocabulary_size, (rows, length)).astype("int32")
    mask = np.ones((rows, length), "int32")
    mask[1, 7:] = 0          # right padding
    mask[2, :3] = 0          # left padding
    mask[3] = 0              # an all-padding row
    return ids, mask


def reference_loss(backbone, ids, mask):
    """The causal-LM loss in numpy (float64) from the model's own logits."""
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    logits = np.asarray(backbone.logits(hidden), "float64")[:, :-1]        # (B, T-1, V)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    pairs = mask[:, :-1] * mask[:, 1:]
    return (nll * pairs).sum() / pairs.sum()


def with_adapter(base, adapter):
    """A fresh enable_lora model on base's weights, carrying `adapter`."""
    model = GemmaBackbone(**TINY_CONFIG)
    model.set_weights(base.get_weights())
    adapter.apply_to(model)
    return model


def table_forward(backbone, tables, ids, mask):
    slots = np.zeros(ids.shape[0], "int32")
    return np.asarray(backbone.selected_hidden_states(ids, mask, LAST, lora=(tables, slots))[0])


def random_adapter(seed, rank, alpha, keys):
    rng = np.random.default_rng(seed)
    kernels = {}
    for block, target in keys:
        heads = CONFIG.num_query_heads if target == "query" else CONFIG.num_key_value_heads
        kernels[(block, target)] = (
            rng.normal(0, 0.3, (heads, CONFIG.hidden_dim, rank)).astype("float32"),
            rng.normal(0, 0.3, (rank, CONFIG.head_dim)).astype("float32"))
    return LoraAdapter(rank=rank, alpha=alpha, kernels=kernels)


def test_step_zero_loss_is_the_base_models_causal_lm_loss(backbone):
    ids, mask = padded_batch()
    expected = reference_loss(backbone, ids, mask)
    values = [v.value for v in backbone.variables]
    np.testing.assert_allclose(float(causal_lm_loss(backbone, values, None, ids, mask)),
                               expected, atol=1e-5)
    # b starts at zero, so the first step's loss (taken before the update)
    # is the base model's.
    trainer = LoraTrainer(backbone, FineTuneConfig(rank=2, steps=1))
    np.testing.assert_allclose(trainer.step(ids, mask), expected, atol=1e-5)


def test_padding_changes_nothing(backbone):
    ids, mask = padded_batch(seed=1, rows=4, length=10)
    adapter = random_adapter(2, rank=3, alpha=3.0,
                             keys=[(b, t) for b in range(2) for t in ("query", "value")])
    table = LoraSlotTable(CONFIG, num_slots=1, max_rank=3)
    tables = table.write(table.zeros(), 0, table.slot_values(adapter))
    values = [v.value for v in backbone.variables]
    loss = jax.jit(causal_lm_loss, static_argnums=0)
    plain = float(loss(backbone, values, tables, ids, mask))
    # More padding columns on the right, garbage under them, and extra
    # all-padding rows.
    big_ids = np.full((6, 16), 123, "int32")
    big_mask = np.zeros((6, 16), "int32")
    big_ids[:4, :10], big_mask[:4, :10] = ids, mask
    np.testing.assert_allclose(float(loss(backbone, values, tables, big_ids, big_mask)), plain,
                               atol=1e-5)
    empty = float(loss(backbone, values, tables, big_ids, np.zeros_like(big_mask)))
    assert empty == 0.0


def test_training_lowers_the_loss_with_one_compilation(trained):
    trainer, losses, _ = trained
    assert len(losses) == TRAIN_CONFIG.steps
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.num_compilations() == 1


def test_base_weights_are_frozen(backbone, trained):
    _, _, weights_before = trained
    for before, after in zip(weights_before, backbone.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_adapter_is_exactly_the_trained_tables(backbone, trained):
    trainer, _, _ = trained
    adapter = trainer.adapter()
    assert (adapter.rank, adapter.alpha) == (4, 6.0)
    assert set(adapter.kernels) == {(b, t) for b in range(2) for t in ("query", "value")}
    tables = trainer.tables()
    slot = LoraSlotTable(CONFIG, num_slots=1, max_rank=4,
                         targets=QV).slot_values(adapter)
    for name, value in tables.items():
        np.testing.assert_array_equal(slot[name], value[:, 0])
    assert set(slot) - set(tables) == {"query_used", "value_used"}  # serving's alone
    # The adapter on a fresh enable_lora model computes what training computed.
    ids, mask = padded_batch(seed=3)
    trained_hidden = table_forward(backbone, tables, ids, mask)
    lora_hidden = np.asarray(with_adapter(backbone, adapter)(
        {"token_ids": ids, "padding_mask": mask}))
    valid = mask.astype(bool)
    np.testing.assert_allclose(lora_hidden[valid], trained_hidden[valid], atol=1e-5)
    base_hidden = np.asarray(backbone({"token_ids": ids, "padding_mask": mask}))
    assert np.abs(trained_hidden[valid] - base_hidden[valid]).max() > 1e-2


def test_inexact_scale_still_round_trips_bit_for_bit(backbone):
    # alpha / rank = 5/3 is not a binary fraction: b must not be divided by it.
    config = FineTuneConfig(rank=3, alpha=5.0, learning_rate=1e-2, steps=2, batch_size=8,
                            sequence_length=16)
    trainer = LoraTrainer(backbone, config)
    for ids, mask in iterate_batches(SEQUENCES, config):
        trainer.step(ids, mask)
    tables = trainer.tables()
    slot = LoraSlotTable(CONFIG, num_slots=1, max_rank=3,
                         targets=QV).slot_values(trainer.adapter())
    for name, value in tables.items():
        np.testing.assert_array_equal(slot[name], value[:, 0])
    assert set(slot) - set(tables) == {"query_used", "value_used"}  # serving's alone
    assert np.abs(tables["value_b"]).max() > 0


def test_starting_from_an_adapter_reproduces_it(backbone):
    # Lower rank, another alpha, and one projection left out.
    initial = random_adapter(4, rank=2, alpha=8.0,
                             keys=[(0, "query"), (0, "value"), (1, "value")])
    trainer = LoraTrainer(backbone, FineTuneConfig(rank=4, steps=1), initial=initial)
    ids, mask = padded_batch(seed=5)
    expected = np.asarray(with_adapter(backbone, initial)(
        {"token_ids": ids, "padding_mask": mask}))
    actual = table_forward(backbone, trainer.tables(), ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(actual[valid], expected[valid], atol=1e-5)
    table = LoraSlotTable(CONFIG, num_slots=1, max_rank=2)
    initial_tables = table.write(table.zeros(), 0, table.slot_values(initial))
    values = [v.value for v in backbone.variables]
    np.testing.assert_allclose(trainer.step(ids, mask),
                               float(causal_lm_loss(backbone, values, initial_tables, ids, mask)),
                               atol=1e-5)


def test_unusable_initial_adapters_are_refused(backbone):
    keys = [(0, "query")]
    with pytest.raises(ValueError, match="rank 4, more than the fine-tune rank 2"):
        LoraTrainer(backbone, FineTuneConfig(rank=2, steps=1),
                    initial=random_adapter(0, rank=4, alpha=4.0, keys=keys))
    with pytest.raises(AdapterMismatch, match="another model"):
        LoraTrainer(backbone, FineTuneConfig(rank=2, steps=1),
                    initial=random_adapter(0, rank=2, alpha=2.0, keys=[(5, "query")]))


def test_bad_batches_are_refused(trained):
    trainer, _, _ = trained
    ids, mask = padded_batch()
    with pytest.raises(TokenIdError, match="must be in"):
        trainer.step(ids + CONFIG.vocabulary_size, mask)
    with pytest.raises(ValueError, match="both be"):
        trainer.step(ids, mask[:, :5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=4), "exactly one of steps and epochs"),
    (dict(rank=4, steps=3, epochs=1), "exactly one of steps and epochs"),
    (dict(rank=0, steps=3), "rank must be a positive integer"),
    (dict(rank=4, steps=0), "steps must be a positive integer"),
    (dict(rank=4, epochs=True), "epochs must be a positive integer"),
    (dict(rank=4, steps=3, alpha=-1.0), "alpha must be a positive number"),
    (dict(rank=4, steps=3, learning_rate=0.0), "learning_rate must be a positive"),
    (dict(rank=4, steps=3, weight_decay=-0.1), "weight_decay must be a non-negative"),
    (dict(rank=4, steps=3, batch_size=0), "batch_size must be a positive"),
    (dict(rank=4, steps=3, sequence_length=1), "sequence_length must be an integer >= 2"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineTuneConfig(**kwargs)


def test_config_alpha_defaults_to_rank():
    assert FineTuneConfig(rank=8, epochs=1).lora_alpha == 8.0
    assert FineTuneConfig(rank=8, epochs=1, alpha=4).scale == 0.5


def test_batches_have_one_shape_and_cover_the_data():
    sequences = [np.arange(1, n + 1, dtype="int32") for n in (3, 30, 7, 1, 12)]
    batches = make_batches(sequences, batch_size=2, sequence_length=8, seed=0, epoch=0)
    assert len(batches) == 3
    assert {(ids.shape, mask.shape) for ids, mask in batches} == {((2, 8), (2, 8))}
    ids = np.concatenate([b[0] for b in batches])
    mask = np.concatenate([b[1] for b in batches])
    # Truncated to 8, right-padded, the last batch filled with an empty row.
    assert sorted(mask.sum(1).tolist()) == [0, 1, 3, 7, 8, 8]
    assert not batches[-1][1][1].any()
    for row, length in zip(ids, mask.sum(1)):
        np.testing.assert_array_equal(row[:length], np.arange(1, length + 1))
        assert not row[length:].any()
    # Seeded per epoch: repeatable, and epochs are shuffled differently.
    def order(seed, epoch):
        return [tuple(m.sum(1)) for _, m in make_batches(sequences, 2, 8, seed, epoch)]
    assert order(0, 0) == order(0, 0)
    assert len({tuple(order(0, e)) for e in range(6)}) > 1


def test_total_steps_and_iteration():
    assert total_steps(17, FineTuneConfig(rank=1, epochs=3, batch_size=8)) == 9
    assert total_steps(17, FineTuneConfig(rank=1, steps=5)) == 5
    config = FineTuneConfig(rank=1, steps=5, batch_size=2, sequence_length=4)
    assert len(list(iterate_batches(SEQUENCES[:3], config))) == 5
    with pytest.raises(ValueError, match="no sequences"):
        next(iterate_batches([], config))


@pytest.fixture()
def no_distribution_leaks():
    yield
    keras.distribution.set_distribution(None)


def test_training_under_model_parallel_matches_unsharded(backbone, no_distribution_leaks):
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                         keras.distribution.list_devices())
    layout_map = GemmaBackbone.get_layout_map(mesh, config=TINY_CONFIG)
    with keras.distribution.ModelParallel(layout_map=layout_map,
                                          batch_dim_name="batch").scope():
        sharded = GemmaBackbone(**TINY_CONFIG)
    sharded.set_weights(backbone.get_weights())
    query = sharded.transformer_layers[0].attention.query.kernel
    assert len(query.value.sharding.device_set) == 8
    config = FineTuneConfig(rank=4, learning_rate=3e-2, steps=3, batch_size=8,
                            sequence_length=16)
    batches = list(iterate_batches(SEQUENCES, config))
    plain, spread = LoraTrainer(backbone, config), LoraTrainer(sharded, config)
    for ids, mask in batches:
        np.testing.assert_allclose(spread.step(ids, mask), plain.step(ids, mask), atol=1e-5)
    assert spread.num_compilations() == 1
    for name, value in spread.tables().items():
        np.testing.assert_allclose(value, plain.tables()[name], atol=1e-4)
