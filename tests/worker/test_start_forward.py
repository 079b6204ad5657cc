"""BackboneWorker's request bookkeeping (start_forward, forward_many,
cancel_forward) with its model call replaced: what each request sends back,
and which requests a cancel stops. The model path is covered through the
service in tests/serving."""

import asyncio
import collections
import pickle

import pytest

from worker.backbone_worker import BackboneWorker
from worker.errors import DeadlineExpired
from worker.forward_work import ForwardResult


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not across processes")


def bare_worker():
    """A BackboneWorker without a model: `forward` answers by request id."""
    worker = object.__new__(BackboneWorker)
    worker._by_ticket = {}
    worker._cancelled_early = set()
    worker._cancelled_order = collections.deque(maxlen=4096)
    worker.forward_calls = 0
    worker.started, worker.stopped = [], []
    worker.release = asyncio.Event()

    async def forward(work):
        worker.started.append(work)
        try:
            if work == "hold":
                await worker.release.wait()
            if work == "expired":
                raise DeadlineExpired("too late")
            if work == "bug":
                raise ValueError("a bug")
            if work == "unpicklable":
                raise Unpicklable("odd")
            return ForwardResult("w", [[work]])
        except asyncio.CancelledError:
            worker.stopped.append(work)
            raise
    worker.forward = forward
    return worker


def test_each_request_sends_back_its_result_or_error_and_never_raises():
    async def main():
        worker = bare_worker()
        tasks = worker.start_forward([(1, "ok"), (2, "expired"), (3, "bug"),
                                      (4, "unpicklable")])
        ok, expired, bug, odd = await asyncio.gather(*tasks)
        assert ok.tensors == [["ok"]]
        assert isinstance(expired, DeadlineExpired)
        assert isinstance(bug, ValueError)
        # What would not unpickle in the coordinator travels as its text.
        assert isinstance(odd, RuntimeError) and "Unpicklable: odd" in str(odd)
        pickle.dumps([ok, expired, bug, odd])
        assert worker._by_ticket == {} and worker.forward_calls == 1
    asyncio.run(main())


def test_a_cancel_stops_only_its_own_request():
    async def main():
        worker = bare_worker()
        held, other = worker.start_forward([(1, "hold"), (2, "hold")])
        await asyncio.sleep(0)
        await worker.cancel_forward([1])
        assert isinstance(await held, asyncio.CancelledError)
        assert worker.stopped == ["hold"] and not other.done()
        worker.release.set()
        assert (await other).tensors == [["hold"]]
        assert worker._by_ticket == {}
    asyncio.run(main())


def test_a_cancel_that_overtakes_its_request_stops_it_before_it_runs():
    async def main():
        worker = bare_worker()
        await worker.cancel_forward([7])  # the request is not there yet
        (task,) = worker.start_forward([(7, "ok")])
        with pytest.raises(asyncio.CancelledError):
            await task
        assert worker.started == [] and worker._by_ticket == {}
        # forward_many (the actor-call path) reports it in its place.
        await worker.cancel_forward([9])
        outcomes = await worker.forward_many([(8, "ok"), (9, "ok")])
        assert outcomes[0].tensors == [["ok"]]
        assert isinstance(outcomes[1], asyncio.CancelledError)
    asyncio.run(main())
