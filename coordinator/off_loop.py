"""CPU work a request carries, run beside the event loop instead of on it.

Tokenizing texts and validating training data take from milliseconds to
seconds; on the event loop they would stall every call of every tenant,
health checks included. Each lane here is one thread. One, not a pool: the
tokenizer and the validation hold the GIL, so threads add no throughput,
and every busy thread is one more the loop waits behind for its turn (the
interpreter hands the GIL over every 5 ms). Two lanes, so that a long
training-data job never queues a Forward behind it.

Work here must come in short steps (one text, one line, one sequence): a
single C call that holds the GIL (one huge `json.loads`, one `np.concatenate`
over a million arrays) stalls the loop from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Callable, TypeVar

T = TypeVar("T")


class Lane:
    """One worker thread; calls run one at a time, in arrival order. A call
    cancelled while still queued never runs."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, function: Callable[..., T], /, *args, **kwargs) -> T:
        """`function(*args, **kwargs)` on this lane's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs))


# A Forward's texts: at most a message's worth, latency matters.
FORWARD = Lane("prepare-forward")
# Fine-tune data, inline or uploaded: up to seconds for a large dataset.
TRAINING_DATA = Lane("prepare-training-data")
