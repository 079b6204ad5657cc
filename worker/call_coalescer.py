"""Sends concurrent forward requests for one worker as one call.

A call (a frame on the worker's forward channel, or a Ray actor call) has a
fixed cost whatever it carries: about 0.2 ms of CPU for a frame, 1.2 ms for
an actor call, against about 0.2 ms per request once several share one
(measured on the 2-core CI machine). Requests reach the coordinator one
event-loop turn apart, so they are only grouped by waiting, and waiting is
free only while the worker is busy anyway: a request for a worker with no
call in flight goes at once; otherwise it waits up to `hold_s` (or until the
worker's calls have all come back, or a full batch is waiting) and goes with
whatever arrived meanwhile. The rows of one call join the worker's batcher
together, so they usually share a batch; where the batcher splits them, each
request's answer still comes back with its own batch (the forward channel
answers requests as they finish).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Awaitable, Callable

from worker.errors import own_copy
from worker.forward_work import Deliver, ForwardResult, ForwardWork

# (ticket, work) pairs in; per pair a ForwardResult or the exception it raised.
# A send may also hand over outcomes early through `deliver`, as the worker
# finishes them; the list it returns still has them all.
SendGroup = Callable[[list[tuple[int, ForwardWork]], Deliver],
                     Awaitable[list["ForwardResult | BaseException"]]]
CancelTickets = Callable[[list[int]], None]


class CallCoalescer:
    """Groups `submit`s to one worker into calls of `send`.

    A call carries at most `max_rows` sequences (the worker's largest batch).
    Work marked `alone` (an adapter the worker may have to load first)
    gets a call of its own, so a slow load holds up no other request.

    Args:
        send: the call for a group, given the group and `deliver`, through
            which it may hand over outcomes before it returns; it raises
            when the call fails (the worker died), and each request not
            answered yet gets that error.
        cancel: tells the worker to drop the tickets of cancelled requests.
        max_rows: the most sequences one call carries.
        hold_s: how long a request may wait for company while the worker is
            busy; 0 sends every request in the loop turn after it arrives.
    """

    def __init__(self, send: SendGroup, cancel: CancelTickets, max_rows: int,
                 hold_s: float = 0.0):
        self._send = send
        self._cancel = cancel
        self._max_rows = max_rows
        self._hold_s = hold_s
        self._tickets = itertools.count(1)
        self._outbox: list[tuple[int, ForwardWork, asyncio.Future]] = []
        self._outbox_rows = 0
        self._flush_handle: asyncio.Handle | None = None
        self._calls: set[asyncio.Task] = set()  # in flight; strong refs until done
        self.calls_sent = 0
        self.works_sent = 0

    async def submit(self, work: ForwardWork, alone: bool = False) -> ForwardResult:
        ticket, future = next(self._tickets), asyncio.get_running_loop().create_future()
        if alone:
            self._start_call([(ticket, work, future)])
        else:
            self._outbox.append((ticket, work, future))
            self._outbox_rows += len(work.sequences)
            self._schedule_flush()
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(ticket)
            raise

    def _withdraw(self, ticket: int) -> None:
        kept = [entry for entry in self._outbox if entry[0] != ticket]
        if len(kept) < len(self._outbox):
            self._outbox = kept
            self._outbox_rows = sum(len(work.sequences) for _, work, _ in kept)
        else:  # already on its way: the worker drops its rows not yet run
            self._cancel([ticket])

    def _schedule_flush(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._calls or not self._hold_s or self._outbox_rows >= self._max_rows:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = loop.call_soon(self._flush)
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self._hold_s, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        group, rows = [], 0
        for entry in self._outbox:
            size = len(entry[1].sequences)
            if group and rows + size > self._max_rows:
                self._start_call(group)
                group, rows = [], 0
            group.append(entry)
            rows += size
        self._outbox, self._outbox_rows = [], 0
        if group:
            self._start_call(group)

    def _start_call(self, group) -> None:
        self.calls_sent += 1
        self.works_sent += len(group)
        task = asyncio.get_running_loop().create_task(self._call(group))
        self._calls.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task) -> None:
        self._calls.discard(task)
        if not self._calls and self._outbox:  # the worker is idle: nothing to wait for
            self._schedule_flush()

    async def _call(self, group) -> None:
        def deliver(index: int, outcome) -> None:
            _settle(group[index][2], outcome)

        try:
            outcomes = await self._send([(ticket, work) for ticket, work, _ in group], deliver)
        except BaseException as error:  # the call failed: every request not answered learns why
            outcomes = [error] * len(group)
        for (_, _, future), outcome in zip(group, outcomes):
            _settle(future, outcome)


def _settle(future: asyncio.Future, outcome) -> None:
    if future.done():  # answered already, or its caller gave up
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        # One object may have failed several requests (the whole call, or
        # one batch): each gets its own copy.
        future.set_exception(own_copy(outcome))
    else:
        future.set_result(outcome)

