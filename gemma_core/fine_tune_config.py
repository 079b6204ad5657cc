"""The hyper-parameters of one LoRA fine-tuning run, as one frozen value."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from gemma_core import lora_targets

DEFAULT_TARGETS = lora_targets.KERAS_HUB_TARGETS
# PEFT's name for every linear projection of a block.
ALL_LINEAR = "all-linear"


def _is_int(value) -> bool:
    # bool is an int subclass; `steps=True` is a mistake, not one step.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    """How to train a LoRA adapter (on chosen projections of every block) with
    the causal-LM loss; see `LoraTrainer`.

    Attributes:
        rank: r, the inner size of every LoRA pair.
        alpha: the update is scaled by `alpha / rank`; None means `rank`
            (keras_hub's convention: the update is `a @ b` unscaled).
        learning_rate: AdamW's step size.
        steps: train for this many steps, cycling through the data as often
            as needed; exactly one of `steps` and `epochs` is set.
        epochs: train for this many passes over the data.
        batch_size: sequences per step (the last batch of an epoch is padded).
        sequence_length: every sequence is truncated (and padded) to this.
        seed: seeds the LoRA initialisation and the per-epoch shuffles.
        weight_decay: AdamW's decoupled weight decay on the LoRA factors.
        targets: the projections to adapt, in our names or PEFT's
            (lora_targets), or ("all-linear",) for all seven. Query/value
            runs train keras_hub's per-head factors (their adapter exports as
            `.lora.h5` too); any other set trains PEFT's factor form, so its
            PEFT export has the run's rank on every module.
        factor_form: overrides that choice of form for query/key/value
            ("keras_hub" or "peft"), e.g. to continue an adapter in its own.

    Example:
    >>> config = FineTuneConfig(rank=8, epochs=3, learning_rate=2e-4)
    >>> config.lora_alpha, config.scale
    (8.0, 1.0)
    """

    rank: int
    alpha: float | None = None
    learning_rate: float = 1e-3
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    sequence_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    targets: Sequence[str] = DEFAULT_TARGETS
    factor_form: str | None = None

    def __post_init__(self) -> None:
        if self.factor_form not in (None, *lora_targets.FORMS):
            raise ValueError(f"FineTuneConfig.factor_form must be None or one of "
                             f"{lora_targets.FORMS}, got {self.factor_form!r}.")
        names = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if names == (ALL_LINEAR,):
            names = lora_targets.TARGETS
        try:
            chosen = {lora_targets.canonical_target(name) for name in names}
        except (ValueError, TypeError) as error:
            raise ValueError(f"FineTuneConfig.targets: {error}") from None
        if not chosen:
            raise ValueError(f"FineTuneConfig.targets must name at least one projection, or "
                             f"be {ALL_LINEAR!r}.")
        # Canonical and in the model's order: equal configs compare equal.
        object.__setattr__(self, "targets",
                           tuple(t for t in lora_targets.TARGETS if t in chosen))
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"FineTuneConfig.rank must be a positive integer, got "
                             f"{self.rank!r}.")
        if self.alpha is not None and (
                isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"FineTuneConfig.alpha must be a positive number or None (to "
                             f"use the rank), got {self.alpha!r}.")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                "FineTuneConfig needs exactly one of steps and epochs (train for a number "
                f"of steps or of passes over the data); got steps={self.steps!r}, "
                f"epochs={self.epochs!r}.")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"FineTuneConfig.{name} must be a positive integer, got "
                                 f"{value!r}.")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"FineTuneConfig.batch_size must be a positive integer, got "
                             f"{self.batch_size!r}.")
        # A target is the token after a position: one token alone teaches nothing.
        if not _is_int(self.sequence_length) or self.sequence_length < 2:
            raise ValueError(f"FineTuneConfig.sequence_length must be an integer >= 2, got "
                             f"{self.sequence_length!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"FineTuneConfig.seed must be an integer, got {self.seed!r}.")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 \
                    or (name == "learning_rate" and value == 0):
                kind = "a positive" if name == "learning_rate" else "a non-negative"
                raise ValueError(f"FineTuneConfig.{name} must be {kind} number, got "
                                 f"{value!r}.")

    @property
    def lora_alpha(self) -> float:
        """`alpha`, or the rank when it is None."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def form(self) -> str:
        """The factor form trained on query/key/value (see `targets`)."""
        if self.factor_form is not None:
            return self.factor_form
        return (lora_targets.KERAS_HUB_FORM if set(self.targets) <= set(DEFAULT_TARGETS)
                else lora_targets.PEFT_FORM)

    @property
    def scale(self) -> float:
        """`alpha / rank`, the factor on every LoRA update (as LoraAdapter.scale)."""
        return self.lora_alpha / self.rank
