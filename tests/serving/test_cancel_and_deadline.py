"""A cancelled call and an expired deadline stop their work: their
sequences are dropped before they reach the device."""

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from service_support import ACME_KEY, keyed_channel
from coordinator.async_client import AsyncGemmaClient
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb


def totals(client):
    workers = client.model_info()["workers"]
    return (sum(int(w.get("sequences_run", 0)) for w in workers),
            sum(int(w.get("sequences_cancelled", 0)) for w in workers))


def heavy_request():
    """16 x 1024 tokens with every layer: one full batch, about a second."""
    rng = np.random.default_rng(0)
    return pb.ForwardRequest(sequences=[pb.TokenSequence(ids=rng.integers(0, 1024, 1024).tolist())
                                        for _ in range(16)], layers=[0, 1, 2, 3, 4])


def keep_workers_busy(address, count=4):
    """Heavy requests on threads so both workers have a queue."""
    def run():
        with keyed_channel(address) as channel:
            from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
            list(pb_grpc.GemmaServiceStub(channel).Forward(heavy_request(), timeout=300))
    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # let them reach the workers before the victim
    return threads


def wait_until_idle(client, bound_s=120):
    end = time.time() + bound_s
    while time.time() < end:
        if all(int(w.get("in_flight_sequences", 0)) == 0 for w in client.model_info()["workers"]):
            return
        time.sleep(0.2)
    raise AssertionError("workers did not drain")


VICTIM = pb.ForwardRequest(sequences=[pb.TokenSequence(ids=[2, 3, 4])] * 3)


def drain(busy, client):
    for thread in busy:
        thread.join(300)
    wait_until_idle(client)


async def cancelled_async_call(address, then):
    """The victim from AsyncGemmaClient, its awaiting task cancelled; `then`
    runs before the channel closes: closing it cancels every call still
    open, which would hide a call the cancelled task left running."""
    async with AsyncGemmaClient(address, api_key=ACME_KEY) as client:
        task = asyncio.create_task(client.forward(
            token_ids=[list(s.ids) for s in VICTIM.sequences], timeout=60))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(then)


@pytest.mark.parametrize("how", ["deadline", "cancel", "async task cancelled"])
def test_abandoned_call_does_no_work(service, stub, client, how):
    wait_until_idle(client)
    run_before, cancelled_before = totals(client)
    busy = keep_workers_busy(service.address)
    if how == "async task cancelled":
        asyncio.run(cancelled_async_call(service.address, lambda: drain(busy, client)))
    else:
        with pytest.raises(grpc.RpcError) as raised:
            if how == "deadline":
                list(stub.Forward(VICTIM, timeout=0.3))
            else:
                call = stub.Forward(VICTIM, timeout=60)
                threading.Timer(0.3, call.cancel).start()
                list(call)
        expected = (grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline"
                    else grpc.StatusCode.CANCELLED)
        assert raised.value.code() == expected
    drain(busy, client)
    run_after, cancelled_after = totals(client)
    assert run_after - run_before == 4 * 16      # only the heavy rows ran
    assert cancelled_after - cancelled_before == 3  # the victim's were dropped
