"""Hidden states over gRPC equal the in-process backbone's."""

import concurrent.futures
import os
import threading

import grpc
import ml_dtypes
import numpy as np
import pytest

from service_support import ACME_KEY, BATCHING
from coordinator.client import GemmaClient

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Sharded backbones stream hidden states.", "Hi"]


def expected_states(model, ids_list, layers):
    """In-process reference: every layer of every sequence, unpadded."""
    out = []
    for ids in ids_list:
        ids = np.asarray(ids, "int32")[None]
        states = model.hidden_states({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                                     layers=layers)
        out.append([np.asarray(s)[0] for s in states])
    return out


def pooled(state, pooling):
    return {"none": state, "last_token": state[-1], "mean": state.mean(0)}[pooling]


@pytest.mark.parametrize("pooling", ["none", "last_token", "mean"])
@pytest.mark.parametrize("source", ["ids", "texts"])
def test_every_pooling_for_ids_and_texts(client, local_model, pooling, source):
    model, tokenizer = local_model
    ids_list = [tokenizer.tokenize(t, add_bos=True) for t in TEXTS]
    layers = [0, 2, -1]
    if source == "texts":
        result = client.forward(texts=TEXTS, layers=layers, pooling=pooling)
    else:
        result = client.forward(token_ids=ids_list, layers=layers, pooling=pooling)
    assert result.layers == [0, 2, 4]
    for got_ids, want_ids in zip(result.token_ids, ids_list):
        np.testing.assert_array_equal(got_ids, want_ids)
    expected = expected_states(model, ids_list, layers)
    for got_seq, want_seq in zip(result.hidden_states, expected):
        for got, want in zip(got_seq, want_seq):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, pooled(want, pooling), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, numpy_dtype", [("float32", np.float32),
                                                ("bfloat16", ml_dtypes.bfloat16),
                                                ("float16", np.float16)])
def test_output_dtypes(client, local_model, dtype, numpy_dtype):
    model, tokenizer = local_model
    ids = tokenizer.tokenize(TEXTS[0], add_bos=True)
    result = client.forward(token_ids=[ids], layers=[1], dtype=dtype)
    got = result.hidden_states[0][0]
    assert got.dtype == numpy_dtype and got.shape == (len(ids), model.hidden_dim)
    want = expected_states(model, [ids], [1])[0][0].astype(numpy_dtype)
    # Identical up to one rounding step of the narrow type.
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                               rtol=2 ** -7 if dtype != "float32" else 0, atol=1e-5)


def test_default_is_final_layer_without_pooling(client, local_model):
    model, tokenizer = local_model
    result = client.forward(texts=["defaults"])
    assert result.layers == [model.num_layers]
    want = expected_states(model, [tokenizer.tokenize("defaults", add_bos=True)], [-1])[0][0]
    np.testing.assert_allclose(result.hidden_states[0][0], want, atol=1e-5)


def test_add_bos_false(client, local_model):
    _, tokenizer = local_model
    result = client.forward(texts=["no bos"], add_bos=False)
    np.testing.assert_array_equal(result.token_ids[0], tokenizer.tokenize("no bos"))


def test_response_over_16_mib_streams_with_default_limits(client, local_model):
    model, _ = local_model
    rng = np.random.default_rng(3)
    ids_list = [rng.integers(0, model.vocabulary_size, 1024) for _ in range(8)]
    result = client.forward(token_ids=ids_list, layers=[0, 1, 2, 3, 4])
    total = sum(t.nbytes for per_layer in result.hidden_states for t in per_layer)
    assert total > 16 * 2**20
    want = expected_states(model, ids_list[-1:], [4])[0][0]
    np.testing.assert_allclose(result.hidden_states[-1][4], want, atol=1e-5)


def worker_totals(client, *keys):
    workers = client.model_info()["workers"]
    return tuple(sum(int(w.get(key, 0)) for w in workers) for key in keys)


def batches_and_sequences(client):
    return worker_totals(client, "batches_run", "sequences_run")


def test_sixteen_concurrent_clients_get_their_own_rows(service, client, local_model):
    model, _ = local_model
    rng = np.random.default_rng(4)
    # One sequence per request, so a batch with two rows holds two requests.
    requests = [[rng.integers(0, model.vocabulary_size, rng.integers(1, 60)).tolist()]
                for _ in range(16)]

    clients = [GemmaClient(service.address, api_key=ACME_KEY) for _ in requests]
    for own_client in clients:
        own_client.model_info()  # connected before the race starts
    start = threading.Barrier(len(clients))

    def call(own_client, ids_list):
        start.wait()
        return own_client.forward(token_ids=ids_list, layers=[-1], pooling="mean")

    counters = ("batches_run", "sequences_run", "forward_requests")
    before = worker_totals(client, *counters)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, clients, requests))
    batches, sequences, received = np.subtract(worker_totals(client, *counters), before)
    for own_client in clients:
        own_client.close()
    for ids_list, result in zip(requests, results):
        expected = expected_states(model, ids_list, [-1])
        for got, want in zip(result.hidden_states, expected):
            np.testing.assert_allclose(got[0], want[0].mean(0), atol=1e-5)
    assert sequences == 16 and received == 16
    assert batches < 16  # requests shared batches, each batch one call to its worker


def test_every_bucket_is_compiled_before_ready_and_nothing_after(service, client,
                                                                  local_model):
    """Each worker compiled every (rows, length) bucket before it said ready
    (its forward and its score program);
    30 requests of random lengths and counts, then one of every bucket
    shape, compile nothing more."""
    model, _ = local_model
    before = {w["worker_id"]: int(w["programs_compiled"]) for w in client.model_info()["workers"]}
    rng = np.random.default_rng(5)
    for _ in range(30):
        count = int(rng.integers(1, 20))
        ids_list = [rng.integers(0, model.vocabulary_size, int(rng.integers(1, 1025)))
                    for _ in range(count)]
        client.forward(token_ids=ids_list, pooling="last_token")
    for rows, length in BATCHING.shapes():
        client.forward(token_ids=[[7] * length] * rows, pooling="last_token")
    info = client.model_info()
    assert info["limits"]["bucket_count"] == 12 == len(BATCHING.shapes())
    for worker in info["workers"]:
        assert int(worker["compiled_functions"]) == 2 * 12  # a forward and a score program each
        assert int(worker["programs_compiled"]) == before[worker["worker_id"]]
        assert int(worker["batch_shapes_seen"]) >= 1


def test_workers_report_the_xla_threads_they_run(client):
    # Counted in each worker's process (local Ray: the same host): what
    # GetModelInfo says is what XLA started, so oversubscription shows.
    for worker in client.model_info()["workers"]:
        names = []
        for thread in os.listdir(f"/proc/{worker['pid']}/task"):
            try:
                with open(f"/proc/{worker['pid']}/task/{thread}/comm") as comm:
                    names.append(comm.read().strip())
            except OSError:  # the thread ended meanwhile
                pass
        assert int(worker.get("cpus", 0)) == 0  # not set: reserves 1, XLA sizes itself
        assert int(worker["xla_cpu_threads"]) == names.count("tf_XLAEigen") >= 2  # 1x2 mesh


@pytest.mark.parametrize("keep", ["start", "end"])
def test_truncation_keeps_the_asked_part_and_says_so(client, local_model, keep):
    """Over the longest bucket (1024): refused by default; with truncation
    the start or the end is kept (a text's <bos> stays first), the header
    says how many tokens were dropped, and the states are the model's on
    exactly the kept tokens."""
    model, tokenizer = local_model
    limit = BATCHING.length_buckets[-1]
    ids = list(np.random.default_rng(11).integers(3, model.vocabulary_size, limit + 37))
    text = "word " * (limit + 50)
    with pytest.raises(grpc.RpcError) as caught:
        client.forward(token_ids=[ids])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncation" in caught.value.details()
    result = client.forward(texts=[text], token_ids=None, truncate=keep)
    full = tokenizer.tokenize(text, add_bos=True)
    kept = full[:limit] if keep == "start" else [full[0], *full[len(full) - limit + 1:]]
    assert result.token_ids[0].tolist() == list(kept)
    assert result.truncated_tokens == [len(full) - limit]
    result = client.forward(token_ids=[ids, ids[:5]], truncate=keep, pooling="mean")
    kept = ids[:limit] if keep == "start" else ids[-limit:]
    assert result.token_ids[0].tolist() == kept
    assert result.truncated_tokens == [37, 0]
    expected = model({"token_ids": np.array([kept], "int32"),
                      "padding_mask": np.ones((1, limit), "int32")})
    np.testing.assert_allclose(result.hidden_states[0][0],
                               np.asarray(expected)[0].mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("pooling, dimensions, normalize", [
    ("mean", 0, True), ("mean", 16, True), ("last_token", 32, False), ("none", 8, True),
    ("mean", 128, False)])
def test_embedding_options_shorten_then_normalize(client, local_model, pooling, dimensions,
                                                  normalize):
    model, tokenizer = local_model
    ids_list = [tokenizer.tokenize(t, add_bos=True) for t in TEXTS]
    result = client.forward(token_ids=ids_list, layers=[2, -1], pooling=pooling,
                            dimensions=dimensions, normalize=normalize)
    expected = expected_states(model, ids_list, [2, -1])
    for got_seq, want_seq in zip(result.hidden_states, expected):
        for got, want in zip(got_seq, want_seq):
            want = pooled(want, pooling)[..., :dimensions or None]
            if normalize:
                want = want / np.linalg.norm(want, axis=-1, keepdims=True)
                np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_embedding_options_are_validated_and_reported(client, stub):
    from coordinator.client import forward_request
    model = client.model_info()
    hidden = int(model["limits"]["hidden_dim"])
    for dimensions in (-1, hidden + 1):
        with pytest.raises(grpc.RpcError) as caught:
            client.forward(token_ids=[[2, 3]], pooling="mean", dimensions=dimensions)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dimensions" in caught.value.details()
    header = next(iter(stub.Forward(forward_request(token_ids=[[2, 3]], pooling="mean",
                                                    dimensions=5, normalize=True),
                                    metadata=(("authorization", f"Bearer {ACME_KEY}"),))))
    assert (header.header.dimensions, header.header.normalized) == (5, True)
    assert list(header.header.sequences[0].shape) == [5]
