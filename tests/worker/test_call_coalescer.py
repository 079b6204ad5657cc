"""The coalescer alone, with an in-memory `send` in place of the actor call
(the real one is covered through the service in tests/serving)."""

import asyncio

import numpy as np
import pytest

from worker.call_coalescer import CallCoalescer
from worker.errors import DeadlineExpired, WorkerUnavailable
from worker.forward_work import ForwardResult, ForwardWork

LONG_HOLD_S = 60.0  # longer than any test: a flush before it is never the timer's


def work(name, rows=1):
    return ForwardWork(name, tuple(np.arange(1, 4, dtype="int32") for _ in range(rows)), (1,))


class Worker:
    """Records each call's tickets and request ids; a call returns only when
    the test releases it. A request named "fail" gets DeadlineExpired."""

    def __init__(self):
        self.calls, self.cancelled, self.release = [], [], []

    async def send(self, group, deliver):
        self.calls.append([w.request_id for _, w in group])
        self.tickets = getattr(self, "tickets", []) + [[t for t, _ in group]]
        released = asyncio.Event()
        self.release.append(released)
        await released.wait()
        return [DeadlineExpired(w.request_id) if w.request_id == "fail"
                else ForwardResult("w", [[np.array(w.request_id)]]) for _, w in group]

    def cancel(self, tickets):
        self.cancelled += tickets

    def release_all(self):
        for event in self.release:
            event.set()


async def turns(n=3):
    for _ in range(n):
        await asyncio.sleep(0)


def coalescer(worker, max_rows=8, hold_s=LONG_HOLD_S):
    return CallCoalescer(worker.send, worker.cancel, max_rows=max_rows, hold_s=hold_s)


def test_a_request_for_an_idle_worker_goes_at_once():
    async def main():
        worker = Worker()
        sender = coalescer(worker)
        task = asyncio.ensure_future(sender.submit(work("a")))
        await turns()
        assert worker.calls == [["a"]]  # no hold: nothing was in flight
        worker.release_all()
        result = await task
        assert result.tensors[0][0] == "a"
    asyncio.run(main())


def test_requests_arriving_while_busy_share_one_call_when_it_comes_back():
    async def main():
        worker = Worker()
        sender = coalescer(worker)
        first = asyncio.ensure_future(sender.submit(work("first")))
        await turns()
        later = [asyncio.ensure_future(sender.submit(work(f"r{i}"))) for i in range(5)]
        await turns()
        assert worker.calls == [["first"]]  # held: the worker is busy
        worker.release[0].set()             # the busy call comes back...
        await turns(6)
        assert worker.calls == [["first"], [f"r{i}" for i in range(5)]]  # ...the rest go as one
        worker.release_all()
        results = await asyncio.gather(first, *later)
        assert [r.tensors[0][0] for r in results] == ["first"] + [f"r{i}" for i in range(5)]
        assert (sender.calls_sent, sender.works_sent) == (2, 6)
    asyncio.run(main())


def test_a_held_request_goes_when_the_hold_ends_even_if_the_worker_stays_busy():
    async def main():
        worker = Worker()
        sender = coalescer(worker, hold_s=0.01)
        asyncio.ensure_future(sender.submit(work("busy")))
        await turns()
        held = asyncio.ensure_future(sender.submit(work("held")))
        for _ in range(500):  # up to 5 s; the hold is 10 ms
            if len(worker.calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert worker.calls == [["busy"], ["held"]]
        worker.release_all()
        assert (await held).tensors[0][0] == "held"
    asyncio.run(main())


def test_a_full_batch_goes_without_waiting_and_calls_never_exceed_max_rows():
    async def main():
        worker = Worker()
        sender = coalescer(worker, max_rows=4)
        asyncio.ensure_future(sender.submit(work("busy")))
        await turns()
        tasks = [asyncio.ensure_future(sender.submit(work(name, rows)))
                 for name, rows in [("a", 2), ("b", 1), ("c", 3)]]
        await turns()
        # 6 rows queued >= 4: flushed with the worker still busy, split so no
        # call holds more than 4 rows.
        assert worker.calls == [["busy"], ["a", "b"], ["c"]]
        worker.release_all()
        await asyncio.gather(*tasks)
    asyncio.run(main())


def test_alone_work_gets_its_own_call_at_once():
    async def main():
        worker = Worker()
        sender = coalescer(worker)
        asyncio.ensure_future(sender.submit(work("busy")))
        await turns()
        queued = asyncio.ensure_future(sender.submit(work("queued")))
        alone = asyncio.ensure_future(sender.submit(work("alone"), alone=True))
        await turns()
        assert worker.calls == [["busy"], ["alone"]]
        worker.release_all()
        await turns(6)
        assert worker.calls[-1] == ["queued"]
        worker.release_all()
        await asyncio.gather(queued, alone)
    asyncio.run(main())


def test_a_request_cancelled_before_its_call_is_never_sent():
    async def main():
        worker = Worker()
        sender = coalescer(worker)
        asyncio.ensure_future(sender.submit(work("busy")))
        await turns()
        dropped = asyncio.ensure_future(sender.submit(work("dropped")))
        kept = asyncio.ensure_future(sender.submit(work("kept")))
        await turns()
        dropped.cancel()
        await turns()
        worker.release_all()
        await turns(6)
        worker.release_all()
        assert (await kept).tensors[0][0] == "kept"
        assert worker.calls == [["busy"], ["kept"]]
        assert worker.cancelled == []  # nothing to tell the worker
    asyncio.run(main())


def test_a_request_cancelled_after_its_call_left_is_cancelled_on_the_worker():
    async def main():
        worker = Worker()
        sender = coalescer(worker, hold_s=0)
        tasks = [asyncio.ensure_future(sender.submit(work(n))) for n in ("a", "b")]
        await turns()
        assert worker.calls == [["a", "b"]]  # same loop turn: one call
        tasks[0].cancel()
        await turns()
        assert worker.cancelled == [worker.tickets[0][0]]  # a's ticket only
        worker.release_all()
        assert (await tasks[1]).tensors[0][0] == "b"
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
    asyncio.run(main())


def test_errors_reach_their_own_request_and_a_failed_call_reaches_all():
    async def main():
        worker = Worker()
        sender = coalescer(worker, hold_s=0)
        ok, fail = (asyncio.ensure_future(sender.submit(work(n))) for n in ("ok", "fail"))
        await turns()
        worker.release_all()
        assert (await ok).tensors[0][0] == "ok"
        with pytest.raises(DeadlineExpired):
            await fail

        async def dead(group, deliver):
            raise WorkerUnavailable("worker-0 died")
        sender = CallCoalescer(dead, worker.cancel, max_rows=8)
        both = [asyncio.ensure_future(sender.submit(work(n))) for n in ("x", "y")]
        for outcome in await asyncio.gather(*both, return_exceptions=True):
            assert isinstance(outcome, WorkerUnavailable)
    asyncio.run(main())


def test_an_answer_handed_over_early_returns_at_once_and_survives_a_later_failure():
    async def main():
        dies = asyncio.Event()

        async def send(group, deliver):
            deliver(1, ForwardResult("w", [[np.array("second")]]))
            await dies.wait()
            raise WorkerUnavailable("worker-0 died")
        sender = CallCoalescer(send, lambda tickets: None, max_rows=8)
        first, second = (asyncio.ensure_future(sender.submit(work(n))) for n in ("a", "b"))
        assert (await asyncio.wait_for(second, 5)).tensors[0][0] == "second"
        assert not first.done()
        dies.set()
        with pytest.raises(WorkerUnavailable):
            await first
    asyncio.run(main())
