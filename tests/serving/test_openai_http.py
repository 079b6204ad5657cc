"""The HTTP front through the official `openai` client and raw HTTP: OpenAI's
embeddings and models API over a real server on 127.0.0.1, with the same
keys, validation and results as gRPC."""

import base64
import http.client
import json
import os
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from service_support import ACME_KEY, API_KEYS, GLOBEX_KEY
from coordinator.client import GemmaClient
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
import safetensors.numpy
from gemma_core import GemmaConfig, LoraAdapter, read_preset_config
from worker.worker_config import BatchingConfig, WorkerSpec

TEXTS = ["The quick brown fox", "jumps over the lazy dog", "Hi"]


@pytest.fixture(scope="module")
def http_service(ray_session, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps(API_KEYS))
    config = ServiceConfig(
        worker=WorkerSpec(preset="default", mesh_shape=(1, 1),
                          batching=BatchingConfig(length_buckets=(16, 64),
                                                  batch_buckets=(1, 4, 8)),
                          compilation_cache_dir=os.environ["GEMMA_SERVE_TEST_COMPILATION_CACHE"]),
        num_workers=1, host="127.0.0.1", port=0, http_port=0, max_sequences_per_request=8,
        max_text_bytes=1024, data_dir=str(tmp_path_factory.mktemp("data")),
        api_keys_file=str(keys_file))
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def grpc_client(http_service):
    with GemmaClient(http_service.address, api_key=ACME_KEY) as client:
        yield client


def openai_client(service, key=ACME_KEY):
    return openai.OpenAI(base_url=f"http://{service.http_address}/v1", api_key=key,
                         max_retries=0, timeout=60)


def raw(service, path, body=None, key=ACME_KEY, method=None, data=None):
    """(status, parsed JSON) of one HTTP call."""
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    payload = data if data is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{service.http_address}{path}", data=payload,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def forward_embeddings(client, texts, adapter_id="", dimensions=0):
    result = client.forward(texts=texts, pooling="mean", normalize=True, dimensions=dimensions,
                            adapter_id=adapter_id)
    return [per_layer[0] for per_layer in result.hidden_states], result.token_ids


def test_embeddings_equal_forwards_mean_pooled_normalized_ones(http_service, grpc_client):
    client = openai_client(http_service)
    want, token_ids = forward_embeddings(grpc_client, TEXTS)
    # Unasked, the SDK requests base64 and decodes it; "float" is JSON numbers.
    for options in ({}, {"encoding_format": "float"}):
        got = client.embeddings.create(model="default", input=TEXTS, **options)
        assert [d.index for d in got.data] == [0, 1, 2] and got.model == "default"
        for item, expected in zip(got.data, want):
            np.testing.assert_allclose(np.asarray(item.embedding, "float32"), expected,
                                       atol=1e-6, rtol=0)
        tokens = sum(len(ids) for ids in token_ids)
        assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    # The SDK asks for base64 by default and decodes it; raw base64 is float32 LE.
    status, body = raw(http_service, "/v1/embeddings", {"model": "default", "input": "Hi",
                                                        "encoding_format": "base64"})
    assert status == 200
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, want[2], atol=1e-6, rtol=0)


def test_dimensions_and_token_inputs(http_service, grpc_client):
    client = openai_client(http_service)
    want, token_ids = forward_embeddings(grpc_client, TEXTS[:2], dimensions=24)
    got = client.embeddings.create(model="default", input=TEXTS[:2], dimensions=24)
    for item, expected in zip(got.data, want):
        vector = np.asarray(item.embedding, "float32")
        assert vector.shape == (24,)
        np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)
        np.testing.assert_allclose(vector, expected, atol=1e-6, rtol=0)
    ids = [list(map(int, t)) for t in token_ids]
    by_ids = client.embeddings.create(model="default", input=ids, dimensions=24)
    one = client.embeddings.create(model="default", input=ids[0], dimensions=24)
    np.testing.assert_allclose(by_ids.data[1].embedding, want[1], atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-6)


def test_models_list_only_the_callers_adapters_and_adapters_embed(http_service, grpc_client,
                                                                   tmp_path):
    config = GemmaConfig.from_kwargs(read_preset_config("default")[1])
    adapter = LoraAdapter.random(config, 4, seed=3)
    path = tmp_path / "a.safetensors"
    path.write_bytes(safetensors.numpy.save(adapter.tensors(), metadata={
        "format": "gemma-serve-lora/1", "base_fingerprint":
            grpc_client.model_info()["base_fingerprint"], **adapter.metadata()}))
    grpc_client.upload_adapter("support", path)
    acme_models = [m.id for m in openai_client(http_service).models.list()]
    assert acme_models == ["default", "support"]
    globex_models = [m.id for m in openai_client(http_service, GLOBEX_KEY).models.list()]
    assert globex_models == ["default"]
    want, _ = forward_embeddings(grpc_client, TEXTS[:1], adapter_id="support")
    base, _ = forward_embeddings(grpc_client, TEXTS[:1])
    got = openai_client(http_service).embeddings.create(model="support", input=TEXTS[:1])
    np.testing.assert_allclose(got.data[0].embedding, want[0], atol=1e-6)
    assert np.abs(np.asarray(got.data[0].embedding) - base[0]).max() > 1e-3
    # Another tenant's adapter answers exactly like an unknown one.
    foreign = raw(http_service, "/v1/embeddings", {"model": "support", "input": "x"},
                  key=GLOBEX_KEY)
    unknown = raw(http_service, "/v1/embeddings", {"model": "nope", "input": "x"},
                  key=GLOBEX_KEY)
    assert foreign[0] == unknown[0] == 404
    assert foreign[1]["error"]["message"].replace("support", "?") == \
        unknown[1]["error"]["message"].replace("nope", "?")
    assert foreign[1]["error"]["code"] == "model_not_found"


def test_wrong_or_missing_key_is_401_in_openais_shape(http_service):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(http_service, "wrong-key").embeddings.create(model="default", input="x")
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
    status, body = raw(http_service, "/v1/models", key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, data, status, words", [
    (None, b"{not json", 400, "not valid JSON"),
    (None, b"[" * 100000, 400, "not valid JSON"),
    ({"model": "default"}, None, 400, "input"),
    ({"model": "default", "input": ""}, None, 400, "empty"),
    ({"model": "default", "input": []}, None, 400, "input"),
    ({"model": "default", "input": [1, "a"]}, None, 400, "mixes"),
    ({"model": "default", "input": [[]]}, None, 400, "input"),
    ({"model": "default", "input": 5}, None, 400, "input"),
    ({"model": "default", "input": [-1]}, None, 400, "outside"),
    ({"model": "default", "input": [2 ** 40]}, None, 400, "32-bit"),
    ({"model": "default", "input": "x", "dimensions": 2 ** 40}, None, 400, "32-bit"),
    ({"model": "default", "input": ["a"] * 9}, None, 400, "9 items"),
    ({"model": "default", "input": "word " * 400}, None, 400, "bytes"),
    ({"model": "default", "input": "x", "dimensions": 0}, None, 400, "dimensions"),
    ({"model": "default", "input": "x", "dimensions": 10 ** 6}, None, 400, "dimensions"),
    ({"model": "default", "input": "x", "encoding_format": "hex"}, None, 400,
     "encoding_format"),
    ({"model": 3, "input": "x"}, None, 400, "model"),
    ({"input": "x"}, None, 400, "model"),
    ({"model": "default", "input": "x", "temperature": 1}, None, 400, "unknown parameter"),
    ({"model": "no-such-model", "input": "x"}, None, 404, "does not exist"),
])
def test_bad_requests_get_4xx_with_a_clear_message(http_service, body, data, status, words):
    got_status, got = raw(http_service, "/v1/embeddings", body, data=data, method="POST")
    assert got_status == status, got
    assert words in got["error"]["message"] and got["error"]["type"]
    # ... and the server keeps serving.
    assert raw(http_service, "/v1/embeddings", {"model": "default", "input": "ok"})[0] == 200


def test_a_huge_body_is_413_before_it_is_read(http_service):
    host, port = http_service.http_address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/embeddings")
    connection.putheader("authorization", f"Bearer {ACME_KEY}")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(1 << 30))  # announced, never sent
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 413 and "limit" in body["error"]["message"]
    connection.close()
    assert raw(http_service, "/v1/embeddings", {"model": "default", "input": "ok"})[0] == 200


def test_unknown_routes_and_methods_answer_in_openais_shape(http_service):
    assert raw(http_service, "/v1/chat/completions", {"x": 1})[0] == 404
    status, body = raw(http_service, "/v1/embeddings", method="GET")
    assert status == 405 and "error" in body


def test_score_route_answers_as_the_score_rpc(http_service, grpc_client):
    ask = dict(token_logprobs=True, top_k=3, top_k_positions=[0, -1], candidates=["A", "B"])
    want = grpc_client.score(texts=TEXTS[:2], **ask)
    status, got = raw(http_service, "/v1/score", {"model": "default", "input": TEXTS[:2], **ask})
    assert status == 200, got
    assert got["model"] == "default" and got["candidate_ids"] == want.candidate_ids
    assert got["usage"]["prompt_tokens"] == sum(len(s.token_ids) for s in want.sequences)
    for g, w in zip(got["sequences"], want.sequences, strict=True):
        assert g["token_ids"] == w.token_ids.tolist()
        np.testing.assert_allclose(g["token_logprobs"], w.token_logprobs, atol=1e-6)
        np.testing.assert_allclose(g["candidate_probs"], w.candidate_probs, atol=1e-6)
        for g_top, (position, ids, logprobs) in zip(g["top_tokens"], w.top_tokens, strict=True):
            assert g_top["position"] == position and g_top["ids"] == ids.tolist()
            np.testing.assert_allclose(g_top["logprobs"], logprobs, atol=1e-6)
    ids = [list(map(int, s.token_ids)) for s in want.sequences]
    status, by_ids = raw(http_service, "/v1/score", {"model": "default", "input": ids,
                                                     "candidates": want.candidate_ids})
    assert status == 200
    np.testing.assert_allclose(by_ids["sequences"][1]["candidate_probs"],
                               want.sequences[1].candidate_probs, atol=1e-6)
    assert by_ids["sequences"][1]["token_logprobs"] == []   # not asked
    status, no_bos = raw(http_service, "/v1/score", {"model": "default", "input": TEXTS[:1],
                                                     "add_bos": False, "top_k": 1})
    assert status == 200 and no_bos["sequences"][0]["token_ids"] == ids[0][1:]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "default", "input": "x"}, 400, "nothing to score"),
    ({"model": "default", "input": "x", "top_k": "3"}, 400, "integer"),
    ({"model": "default", "input": "x", "token_logprobs": 1}, 400, "true or false"),
    ({"model": "default", "input": "x", "candidates": ["A", 3]}, 400, "candidates"),
    ({"model": "default", "input": "x", "candidates": ["hello world"]}, 400, "one token"),
    ({"model": "default", "input": "x", "top_k": 1, "top_k_positions": [2 ** 40]}, 400,
     "32-bit"),
    ({"model": "default", "input": "x", "top_k": 50}, 400, "top_k"),
    ({"model": "default", "input": "x", "truncation": "middle"}, 400, "truncation"),
    ({"model": "default", "input": "x", "top_k": 1, "add_bos": "yes"}, 400, "add_bos"),
    ({"model": "default", "input": [[5, 6]], "top_k": 1, "add_bos": False}, 400, "texts only"),
    ({"model": "default", "input": "x", "logprobs": True}, 400, "unknown parameter"),
    ({"model": "nope", "input": "x", "top_k": 1}, 404, "does not exist"),
])
def test_bad_score_requests_get_4xx_with_a_clear_message(http_service, body, status, words):
    got_status, got = raw(http_service, "/v1/score", body)
    assert got_status == status, got
    assert words in got["error"]["message"]
    assert raw(http_service, "/v1/score", {"model": "default", "input": "ok", "top_k": 1})[0] \
        == 200
