"""AsyncGemmaClient: many calls from one event loop, the same answers as the
blocking client's, errors as grpc.RpcError."""

import asyncio

import grpc
import numpy as np
import pytest

from service_support import ACME_KEY
from coordinator.async_client import AsyncGemmaClient
from test_forward_over_grpc import TEXTS, expected_states


def test_concurrent_calls_get_their_own_results(service, client, local_model):
    model, _ = local_model
    rng = np.random.default_rng(11)
    ids_lists = [[rng.integers(0, model.vocabulary_size, rng.integers(1, 40)).tolist()]
                 for _ in range(16)]

    async def run():
        async with AsyncGemmaClient(service.address, api_key=ACME_KEY) as async_client:
            by_ids = await asyncio.gather(*(
                async_client.forward(token_ids=ids, layers=[0, -1], pooling="last_token")
                for ids in ids_lists))
            by_text = await async_client.forward(texts=TEXTS, dtype="bfloat16")
            info = await async_client.model_info()
        return by_ids, by_text, info

    by_ids, by_text, info = asyncio.run(run())
    for ids, result in zip(ids_lists, by_ids):
        assert result.layers == [0, model.num_layers]
        want = expected_states(model, ids, [0, model.num_layers])[0]
        for got, expected in zip(result.hidden_states[0], want):
            np.testing.assert_allclose(got, expected[-1], atol=1e-5)
    blocking = client.forward(texts=TEXTS, dtype="bfloat16")
    assert [t.tolist() for t in by_text.token_ids] == [t.tolist() for t in blocking.token_ids]
    for got, expected in zip(by_text.hidden_states, blocking.hidden_states):
        assert got[0].dtype == expected[0].dtype
        np.testing.assert_array_equal(got[0], expected[0])
    assert info["tenant"] == "acme" and len(info["workers"]) == 2


def test_errors_are_rpc_errors_with_the_status(service):
    async def run(**request):
        async with AsyncGemmaClient(service.address, api_key=ACME_KEY) as async_client:
            return await async_client.forward(**request)

    with pytest.raises(grpc.RpcError) as raised:
        asyncio.run(run(token_ids=[[]]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[0]" in raised.value.details()

    async def unauthenticated():
        async with AsyncGemmaClient(service.address, api_key="not-a-key") as async_client:
            return await async_client.model_info()

    with pytest.raises(grpc.RpcError) as raised:
        asyncio.run(unauthenticated())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_score_as_the_blocking_client(service, client):
    async def run():
        async with AsyncGemmaClient(service.address, api_key=ACME_KEY) as async_client:
            return await asyncio.gather(*(
                async_client.score(texts=[text], token_logprobs=True, candidates=[5, 6])
                for text in TEXTS))

    for text, got in zip(TEXTS, asyncio.run(run())):
        want = client.score(texts=[text], token_logprobs=True, candidates=[5, 6])
        np.testing.assert_allclose(got.sequences[0].token_logprobs,
                                   want.sequences[0].token_logprobs, atol=1e-5)
        np.testing.assert_allclose(got.sequences[0].candidate_probs,
                                   want.sequences[0].candidate_probs, atol=1e-5)
