"""Fine-tuning a LoRA adapter with the causal-LM loss, base weights frozen.

The trainable state is one adapter's factors for every block, in the form
the run trains (lora_targets), turned into one slot of a `LoraSlotTable` on
every step: the same arrays the serving path feeds to
`GemmaBackbone.selected_hidden_states`, so what is trained is exactly what is
served. The backbone's weights enter the jitted step as arguments and are
never differentiated; only the factors and the optimizer's state change.

Axes: B rows, T positions, V vocabulary, L blocks, N query heads, K key/value
heads, d model width, R rank, h head size.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from keras import ops

from gemma_core import lora_targets
from gemma_core.errors import AdapterMismatch
from gemma_core.fine_tune_config import FineTuneConfig
from gemma_core.lora_adapter import LoraAdapter
from gemma_core.lora_slot_table import Tables, to_slot_form
from gemma_core.lora_targets import HEAD_TARGETS


def causal_lm_loss(backbone, variable_values, tables: Tables | None, token_ids,
                   padding_mask):
    """Mean next-token cross-entropy over real (unpadded) positions.

    Position t predicts token t + 1; a pair counts only when both tokens are
    real, so padding (anywhere in a row) and all-padding rows change nothing.
    Pure, so it can be jitted and differentiated in `tables`.

    Args:
        backbone: a `GemmaBackbone`.
        variable_values: values for `backbone.variables`, in that order.
        tables: LoRA tables with one slot (slot 0 runs on every row), `alpha /
            rank` folded into b as `LoraSlotTable.slot_values` does; None for
            the model without LoRA.
        token_ids, padding_mask: (B, T) int.

    Returns:
        A float32 scalar; 0 when the batch has no real pair.

    Example:
    >>> values = [v.value for v in backbone.variables]
    >>> loss = causal_lm_loss(backbone, values, None, ids, mask)
    """
    token_ids = ops.convert_to_tensor(token_ids, "int32")
    padding_mask = ops.convert_to_tensor(padding_mask, "int32")
    lora = None
    if tables is not None:
        lora = (tables, ops.zeros((token_ids.shape[0],), "int32"))
    with backbone.bound_to(variable_values):
        hidden = backbone.selected_hidden_states(
            token_ids, padding_mask, np.array([backbone.num_layers], "int32"),
            lora=lora)[0]                                                # (B, T, d)
        # float32, soft-capped: the tied embedding is the head.
        logits = backbone.logits(hidden[:, :-1])                         # (B, T-1, V)
    log_probs = jax.nn.log_softmax(ops.cast(logits, "float32"), axis=-1)
    targets = token_ids[:, 1:]                                           # (B, T-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    pairs = ops.cast(padding_mask[:, :-1] * padding_mask[:, 1:], "float32")
    return ops.sum(nll * pairs) / ops.maximum(ops.sum(pairs), 1.0)


def make_batches(sequences: Sequence[np.ndarray], batch_size: int, sequence_length: int,
                 seed: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of fixed-shape batches: shuffled, truncated, right-padded.

    Every batch is (batch_size, sequence_length), the last one filled up with
    all-padding rows, so a training step compiles once for the whole run.

    Args:
        sequences: 1-D token-id arrays (any lengths).
        batch_size, sequence_length: the batch shape.
        seed, epoch: the shuffle depends on both, so epochs differ and runs
            repeat.

    Returns:
        [(token_ids (batch_size, sequence_length) int32, padding_mask same)].

    Example:
    >>> batches = make_batches([np.arange(5), np.arange(9)], 4, 8, seed=0, epoch=0)
    >>> [ids.shape for ids, _ in batches]
    [(4, 8)]
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(sequences))
    batches = []
    for start in range(0, len(order), batch_size):
        ids = np.zeros((batch_size, sequence_length), "int32")
        mask = np.zeros((batch_size, sequence_length), "int32")
        for row, index in enumerate(order[start:start + batch_size]):
            sequence = np.asarray(sequences[index]).reshape(-1)[:sequence_length]
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        batches.append((ids, mask))
    return batches


def total_steps(num_sequences: int, config: FineTuneConfig) -> int:
    """How many steps `config` trains for on `num_sequences` sequences."""
    if config.steps is not None:
        return config.steps
    return config.epochs * math.ceil(num_sequences / config.batch_size)


def iterate_batches(sequences: Sequence[np.ndarray],
                    config: FineTuneConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`total_steps` batches, epoch after epoch of `make_batches`."""
    if not len(sequences):
        raise ValueError("there is nothing to train on: the dataset has no sequences.")
    remaining, epoch = total_steps(len(sequences), config), 0
    while remaining:
        for batch in make_batches(sequences, config.batch_size, config.sequence_length,
                                  config.seed, epoch)[:remaining]:
            remaining -= 1
            yield batch
        epoch += 1


def _replicated(backbone):
    """A sharding that puts small state on every device the backbone's
    weights use, so that under ModelParallel nothing mixes meshes, and the
    step's outputs land where its inputs were (one compilation)."""
    sharding = backbone.variables[0].value.sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))


class LoraTrainer:
    """Trains LoRA on `config.targets` of every block, in `config.form`.

    The factors start as a ~ N(0, 1/fan_in), b = 0 (step 0 is the base
    model), or as `initial`. b is kept without the `alpha / rank` scale, which the
    forward applies; so `adapter()` hands back the trained arrays as they
    are, and `LoraSlotTable.slot_values(trainer.adapter())` holds
    `trainer.tables()` bit for bit (plus the _used entries serving adds).

    Args:
        backbone: a `GemmaBackbone`, possibly sharded under
            `keras.distribution.ModelParallel`; it is never modified.
        config: the run's hyper-parameters.
        initial: an adapter to continue from, on some of the run's targets in
            its form (rank <= config.rank; missing blocks or targets and the
            extra rank start as fresh factors).

    Example:
    >>> trainer = LoraTrainer(backbone, FineTuneConfig(rank=4, epochs=2))
    >>> for ids, mask in iterate_batches(sequences, trainer.config):
    ...     loss = trainer.step(ids, mask)
    >>> adapter = trainer.adapter()
    """

    def __init__(self, backbone, config: FineTuneConfig,
                 initial: LoraAdapter | None = None):
        self.backbone = backbone
        self.config = config
        params = self._initial_params(initial)
        self._names = list(params)
        # Keras' AdamW, used statelessly: it sees these variables only to
        # build its state; the values themselves travel through the step.
        self._variables = [keras.Variable(params[name], name=name, dtype="float32")
                           for name in self._names]
        self._optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                                 weight_decay=config.weight_decay)
        self._optimizer.build(self._variables)
        sharding = _replicated(backbone)
        self._params = jax.device_put(params, sharding)
        self._optimizer_values = jax.device_put(
            [v.value for v in self._optimizer.variables], sharding)
        self._jitted = jax.jit(self._train_step, out_shardings=sharding)

    def _initial_params(self, initial: LoraAdapter | None) -> Tables:
        """"<target>_a" / "_b" -> (L, 1, *factor shape) in the run's form."""
        model, run = self.backbone.config, self.config
        rng = np.random.default_rng(run.seed)
        params = {}
        for target in run.targets:
            a_shape, b_shape = lora_targets.factor_shapes(model, target, run.rank, run.form)
            fan_in = math.prod(lora_targets.peft_axes(model, target)[0])
            lead = (model.num_layers, 1)
            params[f"{target}_a"] = rng.normal(0.0, 1.0 / math.sqrt(fan_in),
                                               lead + a_shape).astype("float32")
            params[f"{target}_b"] = np.zeros(lead + b_shape, "float32")
        if initial is None:
            return params
        initial.check_fits(model)
        others = [t for t in initial.targets if t not in run.targets]
        if others:
            raise AdapterMismatch(f"the initial adapter adapts {others}, which this run does "
                                  f"not train (its targets: {list(run.targets)}).")
        rank = initial.largest_rank
        if rank > run.rank:
            raise ValueError(f"the initial adapter has rank {rank}, more than the fine-tune "
                             f"rank {run.rank}; train at rank >= {rank}.")
        for (block, target), (a, b) in initial.kernels.items():
            r = initial.pair_rank((block, target))
            if target in HEAD_TARGETS and lora_targets.form_of(target, a) != run.form:
                raise AdapterMismatch(
                    f"the initial adapter's {target} factors are in {lora_targets.form_of(target, a)}"
                    f"'s form but this run trains {run.form}'s (query/value-only runs train "
                    "keras_hub's form, others PEFT's); choose targets that match it.")
            # Its update a @ b * its scale, rewritten over our scale; the
            # extra rank keeps random a and zero b, so the forward is unchanged.
            rescale = initial.pair_scale((block, target)) / run.scale
            params[f"{target}_a"][block, 0, ..., :r] = a
            params[f"{target}_b"][block, 0, :r] = b if rescale == 1 else b * rescale
        return params

    def _tables(self, params: Tables) -> Tables:
        """Trainable values -> slot tables (the scale folded into b)."""
        scale = np.float32(self.config.scale)
        tables = {}
        for target in self.config.targets:
            a, b = params[f"{target}_a"], params[f"{target}_b"] * scale
            if target in HEAD_TARGETS:
                a, b = to_slot_form(a, b, xp=jnp)
            tables[f"{target}_a"], tables[f"{target}_b"] = a, b
        return tables

    def _train_step(self, params, optimizer_values, base_values, token_ids, padding_mask):
        def loss_fn(params):
            return causal_lm_loss(self.backbone, base_values, self._tables(params),
                                  token_ids, padding_mask)

        # Differentiated in `params` only: the base weights are constants here.
        loss, grads = jax.value_and_grad(loss_fn)(params)
        names = self._names
        new_values, optimizer_values = self._optimizer.stateless_apply(
            optimizer_values, [grads[n] for n in names], [params[n] for n in names])
        return dict(zip(names, new_values)), optimizer_values, loss

    def step(self, token_ids: np.ndarray, padding_mask: np.ndarray) -> float:
        """One AdamW step on a (B, T) batch; returns the loss before the update.

        Compiles once per batch shape (`make_batches` keeps it to one).
        """
        token_ids = np.asarray(token_ids, "int32")
        padding_mask = np.asarray(padding_mask, "int32")
        if token_ids.shape != padding_mask.shape or token_ids.ndim != 2:
            raise ValueError(f"token_ids and padding_mask must both be (batch, length); got "
                             f"{token_ids.shape} and {padding_mask.shape}.")
        # Inside jit out-of-range ids would be clamped silently.
        self.backbone.validate_token_ids(token_ids)
        base_values = [v.value for v in self.backbone.variables]
        self._params, self._optimizer_values, loss = self._jitted(
            self._params, self._optimizer_values, base_values, token_ids, padding_mask)
        return float(loss)

    def num_compilations(self) -> int:
        """How many batch shapes the step has been compiled for."""
        return self._jitted._cache_size()

    def tables(self) -> Tables:
        """The current LoRA tables (L, 1, ...), float32 on the host, ready for
        `selected_hidden_states(..., lora=(tables, zeros))`."""
        return {name: np.asarray(value) for name, value in self._tables(self._params).items()}

    def adapter(self) -> LoraAdapter:
        """The current factors as an adapter of rank `config.rank` and alpha
        `config.lora_alpha`, with kernels for every block and target, in the
        run's form."""
        params = {name: np.asarray(value) for name, value in self._params.items()}
        kernels = {(block, target): (params[f"{target}_a"][block, 0].copy(),
                                     params[f"{target}_b"][block, 0].copy())
                   for block in range(self.backbone.num_layers)
                   for target in self.config.targets}
        return LoraAdapter(rank=self.config.rank, alpha=self.config.lora_alpha,
                           kernels=kernels)
