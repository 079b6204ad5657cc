"""CPU and disk work a request carries, run beside the event loop instead of
on it, fairly between tenants.

Tokenizing texts and validating training data take from milliseconds to
seconds; on the event loop they would stall every call of every tenant,
health checks included. Each lane here is one thread. One, not a pool: the
tokenizer and the validation hold the GIL, so threads add no throughput,
and every busy thread is one more the loop waits behind for its turn (the
interpreter hands the GIL over every 5 ms). Two lanes, so that a long
training-data job never queues a Forward behind it.

A lane serves tenants in turn (a queue per tenant, round robin), so a
tenant waits behind at most one job of each other tenant, never behind
another's backlog; and a tenant may have only so many jobs waiting.

Work here must come in short steps (one text, one line, one sequence): a
single C call that holds the GIL (one huge `json.loads`, one `np.concatenate`
over a million arrays) stalls the loop from any thread.

A caller cancelled while its work runs in a thread (here or in `in_thread`)
waits for that work to end before the cancellation goes on: whatever the
call holds (an upload slot, a scratch file) stays held until then, so
cancelling and retrying cannot pile up work, and nothing the call would do
next (publishing its result) happens.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import threading
from typing import Any, Callable, TypeVar

from coordinator.errors import ResourceExhausted

T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class _Job:
    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Lane:
    """One worker thread; each tenant's calls run in arrival order, tenants
    take turns. A call cancelled while still queued never runs.

    Args:
        name: the thread's name.
        max_waiting_per_tenant: calls of one tenant that may wait (the one
            running aside); beyond, RESOURCE_EXHAUSTED with a retry hint.
        retry_after_ms: that hint.
    """

    def __init__(self, name: str, max_waiting_per_tenant: int, retry_after_ms: int):
        self.name = name
        self.max_waiting_per_tenant = max_waiting_per_tenant
        self.retry_after_ms = retry_after_ms
        self._ready = threading.Condition()
        # Tenants in turn order, each with its calls in arrival order.
        self._waiting: dict[str, collections.deque[_Job]] = {}
        self._thread: threading.Thread | None = None

    def waiting(self, tenant: str) -> int:
        with self._ready:
            return len(self._waiting.get(tenant, ()))

    async def run(self, tenant: str, function: Callable[..., T], /, *args, **kwargs) -> T:
        """`function(*args, **kwargs)` on this lane's thread, in `tenant`'s turn.

        Raises:
            ResourceExhausted: the tenant already has its limit of calls waiting.
        """
        loop = asyncio.get_running_loop()
        job = _Job(functools.partial(function, *args, **kwargs), loop, loop.create_future())
        with self._ready:
            queue = self._waiting.get(tenant)
            if queue is not None and len(queue) >= self.max_waiting_per_tenant:
                raise ResourceExhausted(
                    f"this tenant already has {len(queue)} requests waiting to be prepared "
                    f"(tokenized or validated), the most allowed; retry after "
                    f"{self.retry_after_ms} ms.", retry_after_ms=self.retry_after_ms)
            self._waiting.setdefault(tenant, collections.deque()).append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name,
                                                daemon=True)
                self._thread.start()
            self._ready.notify()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            with self._ready:
                queue = self._waiting.get(tenant, ())
                queued = job in queue
                if queued:
                    queue.remove(job)
                    if not queue:
                        del self._waiting[tenant]
            if not queued:
                await _outlast(job.future)
            raise

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                tenant = next(iter(self._waiting))
                queue = self._waiting.pop(tenant)
                job = queue.popleft()
                if queue:  # to the back of the turn order
                    self._waiting[tenant] = queue
            try:
                outcome = (_set_result, job.call())
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                outcome = (_set_exception, error)
            with self._ready:
                # Calls that came while its turn ran wait behind every
                # tenant waiting now: it has had its turn.
                if tenant in self._waiting:
                    self._waiting[tenant] = self._waiting.pop(tenant)
            try:
                job.loop.call_soon_threadsafe(*outcome, job.future)
            except RuntimeError:  # the caller's loop has closed: nobody waits
                pass


def _set_result(result, future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(error, future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(error)


async def _outlast(future: asyncio.Future) -> None:
    """Waits until `future` is done, through any number of cancellations
    (the caller re-raises the first); its outcome is dropped."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: nobody will read it


async def in_thread(function: Callable[..., T], /, *args, **kwargs) -> T:
    """`asyncio.to_thread`, except that a caller cancelled meanwhile waits
    for `function` to end before the cancellation goes on (see the module
    docstring). For disk work, which releases the GIL."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    future = loop.run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _outlast(future)
        raise


# A Forward's texts: at most a message's worth, latency matters.
FORWARD = Lane("prepare-forward", max_waiting_per_tenant=16, retry_after_ms=100)
# Fine-tune data, inline or uploaded: up to seconds for a large dataset.
TRAINING_DATA = Lane("prepare-training-data", max_waiting_per_tenant=4, retry_after_ms=1000)
