"""One fine-tune job's training state on a worker, advanced a step at a time.

The scheduler in the coordinator decides when a step runs (between forward
batches); the worker only keeps the trainer and the job's batches.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from gemma_core.lora_trainer import LoraTrainer, iterate_batches, total_steps


@dataclasses.dataclass(frozen=True)
class FineTuneWork:
    """A validated fine-tune job.

    Attributes:
        job_id: for logs.
        sequences: int32 token ids, each at least 2 tokens (a
            `PackedSequences` from the coordinator: two arrays to pickle,
            however many sequences).
        config: a gemma_core `FineTuneConfig`.
        initial: a Ray ObjectRef to (or a) `LoraAdapter` to start from, or None.
    """

    job_id: str
    sequences: Sequence[np.ndarray]
    config: Any
    initial: Any = None

    @property
    def total_steps(self) -> int:
        return total_steps(len(self.sequences), self.config)


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One training step: the loss before its update, its real tokens, and
    its time on the device."""

    loss: float
    tokens: int
    seconds: float = 0.0


class FineTuneSession:
    """A `LoraTrainer` on `backbone` and the batches `work` trains on.

    Args:
        backbone: the worker's (sharded) backbone; only LoRA factors train.
        work: the job.
        initial: the `LoraAdapter` to continue from (`work.initial`
            resolved), or None.
    """

    def __init__(self, backbone, work: FineTuneWork, initial=None):
        self.work = work
        self._trainer = LoraTrainer(backbone, work.config, initial)
        self._batches = iterate_batches(list(work.sequences), work.config)

    def step(self) -> StepReport:
        """Runs the next step.

        Raises:
            StopIteration: every step has run.
        """
        ids, mask = next(self._batches)
        started = time.perf_counter()
        loss = self._trainer.step(ids, mask)
        return StepReport(loss=loss, tokens=int(mask.sum()),
                          seconds=time.perf_counter() - started)

    def adapter(self):
        """The trained `LoraAdapter`."""
        return self._trainer.adapter()
