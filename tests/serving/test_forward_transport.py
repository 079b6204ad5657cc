"""How forward work reaches workers: the direct channel (the default) and
Ray actor calls, each on a real one-worker pool; and the shared service
reports its transport."""

import asyncio

import numpy as np
import ray

from gemma_core import GemmaBackbone, LoraAdapter
from service_support import BATCHING
from worker.forward_work import AdapterRef, ForwardWork
from worker.worker_config import WorkerSpec
from worker.worker_pool import WorkerPool

IDS = np.array([3, 1, 4, 1, 5, 9, 2, 6], "int32")


def one_worker_pool(transport, max_adapters=1):
    spec = WorkerSpec(preset="default", mesh_shape=(1, 1), batching=BATCHING,
                      max_adapters=max_adapters, max_adapter_rank=4)
    return WorkerPool(spec, num_workers=1, transport=transport)


async def worker_info(pool):
    (info,) = await pool.infos()
    return info


def test_the_shared_service_sends_forward_work_over_channels(client):
    def calls():
        workers = client.model_info()["workers"]
        return np.array([sum(int(w.get(k, 0)) for w in workers)
                         for k in ("forward_calls", "forward_channel_calls")])

    before = calls()
    for _ in range(4):
        client.forward(token_ids=[IDS.tolist()])
    assert (calls() - before).tolist() == [4, 4]  # every call, over the socket
    workers = client.model_info()["workers"]
    assert {w["forward_transport"] for w in workers} == {"direct"}


def test_ray_calls_serve_the_same_states(ray_session):
    model = GemmaBackbone.from_preset("default")
    layer = model.num_layers  # the final normed output
    (expected,) = model.hidden_states({"token_ids": IDS[None],
                                       "padding_mask": np.ones((1, len(IDS)), "int32")},
                                      layers=[layer])
    expected = np.asarray(expected)[0]

    async def main():
        pool = one_worker_pool("ray")
        try:
            await pool.wait_ready()
            result = await pool.forward(ForwardWork("r", (IDS,), (layer,)))
            info = await worker_info(pool)
        finally:
            pool.shutdown()
        return result, info

    result, info = asyncio.run(main())
    np.testing.assert_allclose(result.tensors[0][0], expected, atol=1e-5)
    assert info["forward_transport"] == "ray" and info["forward_requests"] == 1


def test_work_for_an_adapter_the_worker_dropped_is_resent_with_its_payload(ray_session):
    base = GemmaBackbone.from_preset("default")
    refs = [AdapterRef(f"t/{name}@1", ray.put(LoraAdapter.random(base.config, rank=2, seed=s,
                                                                 b_std=0.5)))
            for s, name in ((1, "a"), (2, "b"))]
    layer = base.num_layers

    async def main():
        pool = one_worker_pool("direct")
        try:
            await pool.wait_ready()
            run = lambda ref: pool.forward(ForwardWork("r", (IDS,), (layer,), adapter=ref))
            a_first = await run(refs[0])
            # The worker lets `a` go behind the pool's back: the pool's
            # routing hint is stale, as concurrent loads can also leave it.
            (actor,) = pool._actors.values()
            assert await actor.unload_adapters.remote([refs[0].key]) == [refs[0].key]
            a_again = await run(refs[0])
            b = await run(refs[1])
            info = await worker_info(pool)
        finally:
            pool.shutdown()
        return [o.tensors[0][0] for o in (a_first, a_again, b)], info

    (a_first, a_again, b), info = asyncio.run(main())
    np.testing.assert_allclose(a_again, a_first, atol=1e-5)
    assert not np.allclose(b, a_first, atol=1e-3)  # the adapter matters
    assert info["forward_transport"] == "direct"
    # The second request for `a` went over the channel without its payload,
    # found it gone and was sent again with it: four arrivals, three loads.
    assert info["forward_requests"] == 4 and info["adapter_loads"] == 3


def test_big_results_and_a_broken_channel_go_over_ray(ray_session):
    model = GemmaBackbone.from_preset("default")
    layer, row_bytes = model.num_layers, model.hidden_dim * 4

    async def main():
        # A pooled result (one row) fits a frame; every token's state does not.
        pool = WorkerPool(WorkerSpec(preset="default", mesh_shape=(1, 1), batching=BATCHING),
                          num_workers=1, hidden_dim=model.hidden_dim,
                          max_channel_result_bytes=2 * row_bytes)
        try:
            await pool.wait_ready()
            run = lambda pooling: pool.forward(ForwardWork("r", (IDS,), (layer,),
                                                           pooling=pooling))
            counts = []

            async def count():
                info = await worker_info(pool)
                counts.append((info["forward_calls"], info["forward_channel_calls"],
                               info["forward_transport"]))

            small = await run("mean")
            await count()
            big = await run("none")
            await count()
            # A middlebox resets the connection; the worker itself is fine.
            (channel,) = pool._channels.values()
            channel._writer.transport.abort()
            again = await run("mean")  # while it is down: over Ray
            for _ in range(300):
                (info,) = await pool.infos()
                if info["forward_transport"] == "direct":
                    break
                await asyncio.sleep(0.1)
            await count()
            await run("mean")
            await count()
            return small, big, again, counts, pool.restarts
        finally:
            pool.shutdown()

    small, big, again, counts, restarts = asyncio.run(main())
    np.testing.assert_allclose(small.tensors[0][0], big.tensors[0][0].mean(0), atol=1e-5)
    np.testing.assert_allclose(again.tensors[0][0], small.tensors[0][0], atol=1e-6)
    assert counts[0] == (1, 1, "direct")
    assert counts[1] == (2, 1, "direct")   # the big one came over Ray
    assert counts[2][:2] == (3, 1) and counts[2][2] == "direct"  # reconnected, not restarted
    assert counts[3] == (4, 2, "direct")
    assert restarts == 0


def test_a_channel_that_broke_too_often_is_tried_again_later(ray_session):
    from worker.worker_pool import MAX_CHANNEL_BREAKS

    async def until_direct(pool):
        for _ in range(300):
            if (await worker_info(pool))["forward_transport"] == "direct":
                return pool._channels["worker-0"]
            await asyncio.sleep(0.1)
        raise AssertionError("the channel did not come back")

    async def main():
        pool = WorkerPool(WorkerSpec(preset="default", mesh_shape=(1, 1), batching=BATCHING),
                          num_workers=1, channel_retry_s=0.5)
        try:
            await pool.wait_ready()
            for _ in range(MAX_CHANNEL_BREAKS):  # the last break gives up reconnecting
                channel = await until_direct(pool)
                channel._writer.transport.abort()
                while channel.usable:  # the pool has seen this break
                    await asyncio.sleep(0.01)
            await until_direct(pool)  # ... for a while: the later try brings it back
            before = (await worker_info(pool))["forward_channel_calls"]
            await pool.forward(ForwardWork("r", (IDS,), (1,)))
            after = (await worker_info(pool))["forward_channel_calls"]
            return after - before, pool.restarts, dict(pool._channel_retry_delay)
        finally:
            pool.shutdown()

    over_channel, restarts, next_delays = asyncio.run(main())
    assert over_channel == 1 and restarts == 0
    assert next_delays == {"worker-0": 1.0}  # one delayed try; the next would wait twice as long
