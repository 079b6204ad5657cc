"""A float32 model asks XLA for float32 dots everywhere it multiplies, so a
GPU's TF32 default cannot take its precision; lower-precision models keep
the default. Read off the lowered program, so it is checked on any machine."""

import re

import jax
import numpy as np
import pytest

from fixture_support import TINY_CONFIG
from gemma_core import FineTuneConfig, GemmaBackbone, LoraSlotTable, LoraTrainer


def dot_precisions(jitted, *args):
    """The precision of every dot_general in the lowered program, traced
    inside a caller's bfloat16 default (what the model must override)."""
    with jax.default_matmul_precision("bfloat16"):
        text = jitted.lower(*args).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots, "no matmuls found: the test reads the wrong program"
    return [re.search(r"precision = \[(\w+), (\w+)\]", line).groups() for line in dots]


def programs(backbone):
    """The forward, the served forward with per-row adapters, the logits and
    a fine-tuning step."""
    values = [v.value for v in backbone.variables]
    ids = np.zeros((2, 8), "int32")
    mask = np.ones((2, 8), "int32")
    table = LoraSlotTable(backbone.config, num_slots=2, max_rank=4)
    layer_ids = np.array([backbone.num_layers], "int32")

    def served(values, tables, slot_ids):
        with backbone.bound_to(values):
            return backbone.selected_hidden_states(ids, mask, layer_ids, lora=(tables, slot_ids))

    def logits(values, hidden):
        with backbone.bound_to(values):
            return backbone.logits(hidden)

    hidden = np.zeros((2, 8, backbone.hidden_dim), backbone.compute_dtype)
    trainer = LoraTrainer(backbone, FineTuneConfig(rank=2, steps=1))
    yield "forward", jax.jit(backbone.stateless_hidden_states), (
        values, {"token_ids": ids, "padding_mask": mask})
    yield "served with adapters", jax.jit(served), (
        values, table.zeros(), np.array([1, 0], "int32"))
    yield "logits", jax.jit(logits), (values, hidden)
    # A fine-tuning step: the forward, the loss through the logits, the gradients.
    yield "fine-tune step", trainer._jitted, (trainer._params, trainer._optimizer_values,
                                              values, ids, mask)


def test_float32_model_runs_every_dot_in_float32():
    backbone = GemmaBackbone(**TINY_CONFIG)
    for name, jitted, args in programs(backbone):
        precisions = set(dot_precisions(jitted, *args))
        assert precisions == {("HIGHEST", "HIGHEST")}, (name, precisions)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lower_precision_models_keep_the_default(dtype):
    backbone = GemmaBackbone(**TINY_CONFIG, dtype=dtype)
    for name, jitted, args in programs(backbone):
        assert ("HIGHEST", "HIGHEST") not in set(dot_precisions(jitted, *args)), name
