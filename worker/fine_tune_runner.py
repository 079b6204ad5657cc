"""Fine-tune jobs on a worker: training steps between forward batches.

A step runs on the same device thread as the batcher's forwards, one at a
time, so a training job slows its worker's serving but never stops it, and
other workers are untouched. Progress comes out as plain dicts; the last
one of a successful job carries the trained adapter.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Sequence

import numpy as np
import ray

from gemma_core.lora_trainer import LoraTrainer, iterate_batches, total_steps
from worker.errors import FineTuneFailed

log = logging.getLogger("gemma_serve.fine_tune")

# Progress is reported at most this often (and always for the first and
# last step), so a fast job does not flood the caller.
_REPORT_EVERY_S = 0.2


@dataclasses.dataclass(frozen=True)
class FineTuneWork:
    """A validated fine-tune job.

    Attributes:
        job_id: for logs and cancel.
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


class FineTuneRunner:
    """Runs jobs on `model` (a ShardedBackbone) using `executor`, the
    worker's device thread."""

    def __init__(self, model, executor: concurrent.futures.Executor):
        self._model = model
        self._executor = executor
        self._cancelled: set[str] = set()
        self._finished: collections.deque[str] = collections.deque(maxlen=1000)
        self.steps_run = 0

    def cancel(self, job_id: str) -> None:
        # A cancel may come before the job starts here (it then never runs a
        # step) or after it ended (ignored, so the set does not grow).
        if job_id not in self._finished:
            self._cancelled.add(job_id)

    async def run(self, job: FineTuneWork) -> AsyncIterator[dict]:
        """Yields {"state": "running", "step", "total_steps", "loss",
        "first_loss", "tokens_per_second", "eta_seconds"} while training, then
        one final dict: state "succeeded" with "adapter", or "cancelled".

        Raises:
            FineTuneFailed: the job could not run or diverged (nothing is
                published).
        """
        try:
            async for progress in self._train(job):
                yield progress
        except FineTuneFailed:
            raise
        except Exception as error:  # noqa: BLE001 - reported to the job's owner
            log.warning("fine-tune %s failed", job.job_id, exc_info=True)
            raise FineTuneFailed(f"{type(error).__name__}: {error}") from None
        finally:
            self._finished.append(job.job_id)
            self._cancelled.discard(job.job_id)

    async def _train(self, job: FineTuneWork) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        initial = job.initial
        if isinstance(initial, ray.ObjectRef):
            initial = await initial
        trainer = await loop.run_in_executor(
            self._executor, LoraTrainer, self._model.backbone, job.config, initial)
        total = total_steps(len(job.sequences), job.config)
        progress = {"state": "running", "step": 0, "total_steps": total, "loss": 0.0,
                    "first_loss": 0.0, "tokens_per_second": 0.0, "eta_seconds": 0.0}
        started, tokens, last_report = time.perf_counter(), 0, 0.0
        for ids, mask in iterate_batches(list(job.sequences), job.config):
            if job.job_id in self._cancelled:
                yield {**progress, "state": "cancelled", "eta_seconds": 0.0}
                return
            loss = await loop.run_in_executor(self._executor, trainer.step, ids, mask)
            step = progress["step"] + 1
            if not np.isfinite(loss):
                raise FineTuneFailed(f"the loss became {loss} at step {step}; lower the "
                                     "learning rate.")
            self.steps_run += 1
            tokens += int(mask.sum())
            elapsed = time.perf_counter() - started
            progress.update(step=step, loss=float(loss),
                            first_loss=progress["first_loss"] if step > 1 else float(loss),
                            tokens_per_second=tokens / max(elapsed, 1e-9),
                            eta_seconds=elapsed / step * (total - step))
            now = time.perf_counter()
            if step in (1, total) or now - last_report >= _REPORT_EVERY_S:
                last_report = now
                yield dict(progress)
        adapter = await loop.run_in_executor(self._executor, trainer.adapter)
        yield {**progress, "state": "succeeded", "eta_seconds": 0.0, "adapter": adapter}
