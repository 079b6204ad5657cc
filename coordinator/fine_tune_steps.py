"""A fine-tune job driven step by step on one worker, in turns its
scheduler grants between forward batches: training slows that worker's
serving, never stops it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import AsyncIterator

from worker.errors import FineTuneFailed
from worker.fine_tune_session import FineTuneWork

log = logging.getLogger("gemma_serve.fine_tune")

# Progress is reported at most this often (and always for the first and
# last step), so a fast job does not flood its watchers.
REPORT_EVERY_S = 0.2


async def train(scheduler, work: FineTuneWork,
                cancelled: asyncio.Event) -> AsyncIterator[dict]:
    """Yields {"state": "running", "step", "total_steps", "loss",
    "first_loss", "tokens_per_second", "eta_seconds"} while training, then
    one final dict: state "succeeded" with "adapter", or "cancelled" (once
    `cancelled` is set, at the next step boundary).

    Raises:
        FineTuneFailed: the job could not run or diverged.
        WorkerUnavailable: the worker went down.
    """
    executor = scheduler.executor
    total = work.total_steps
    progress = {"state": "running", "step": 0, "total_steps": total, "loss": 0.0,
                "first_loss": 0.0, "tokens_per_second": 0.0, "eta_seconds": 0.0}
    finished = False
    try:
        await executor.start_fine_tune(work)
        started, tokens, last_report = time.perf_counter(), 0, 0.0
        while True:
            if cancelled.is_set():
                yield {**progress, "state": "cancelled", "eta_seconds": 0.0}
                return
            async with scheduler.training_turn() as turn:
                report = await executor.fine_tune_step(work.job_id)
                turn.device_seconds = None if report is None else report.seconds
            if report is None:
                break
            step = progress["step"] + 1
            if not math.isfinite(report.loss):
                raise FineTuneFailed(f"the loss became {report.loss} at step {step}; lower "
                                     "the learning rate.")
            tokens += report.tokens
            elapsed = time.perf_counter() - started
            progress.update(step=step, loss=report.loss,
                            first_loss=progress["first_loss"] if step > 1 else report.loss,
                            tokens_per_second=tokens / max(elapsed, 1e-9),
                            eta_seconds=elapsed / step * (total - step))
            now = time.perf_counter()
            if step in (1, total) or now - last_report >= REPORT_EVERY_S:
                last_report = now
                yield dict(progress)
        adapter = await executor.finish_fine_tune(work.job_id)
        finished = True
        yield {**progress, "state": "succeeded", "eta_seconds": 0.0, "adapter": adapter}
    finally:
        if not finished:  # the worker's training state is dropped, whatever ended the job
            _DROPS.add(task := asyncio.get_running_loop().create_task(
                _drop(executor, work.job_id)))
            task.add_done_callback(_DROPS.discard)


_DROPS: set[asyncio.Task] = set()  # strong refs: the loop keeps weak ones


async def _drop(executor, job_id: str) -> None:
    try:
        await executor.drop_fine_tune(job_id)
    except Exception as error:  # noqa: BLE001 - a dead worker has dropped it already
        log.debug("could not drop fine-tune %s: %s", job_id, error)
