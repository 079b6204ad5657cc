"""Score over gRPC on a real service: Gemma 1 (the keras_hub fixture, with
and without its LoRA adapter) against numpy on the fixture's own outputs;
Score and Forward requests sharing batches; bad requests refused. (Gemma 2
with PEFT adapters: test_peft_over_grpc.py; the CLI: test_cli.py.)"""

import concurrent.futures
import json
import os

import grpc
import numpy as np
import pytest

from fixture_support import FIXTURES, reference
from service_support import ACME_KEY, API_KEYS, operator_worker_infos
from coordinator.client import GemmaClient
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from gemma_core import GemmaBackbone
from worker.worker_config import BatchingConfig, WorkerSpec

FIXTURE = FIXTURES / "gemma1_tiny"
BATCHING = BatchingConfig(length_buckets=(16,), batch_buckets=(1, 4, 8), max_batch_tokens=128)


def numpy_log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def sequences():
    ref = reference("gemma1_tiny")
    return [ids[mask.astype(bool)].tolist() for ids, mask in zip(ref["token_ids"],
                                                                   ref["padding_mask"])]


def check_scores(result, logits, top_k, positions, candidate_ids, atol=1e-4, inputs=None):
    """`result` (a ScoreResult for `inputs`, by default this fixture's
    `sequences()`) against numpy on the reference `logits` (2, 12, V)."""
    want = numpy_log_softmax(logits)
    for row, (ids, got) in enumerate(zip(inputs or sequences(), result.sequences,
                                         strict=True)):
        n = len(ids)
        ids = [int(i) for i in ids]
        assert got.token_ids.tolist() == ids
        expected = want[row, np.arange(n - 1), ids[1:]]
        np.testing.assert_allclose(got.token_logprobs, expected, atol=atol, rtol=0)
        assert [p for p, _, _ in got.top_tokens] == [p % n for p in positions]
        for position, top_ids, top_lp in got.top_tokens:
            order = np.argsort(-want[row, position], kind="stable")[:top_k]
            np.testing.assert_allclose(top_lp, want[row, position, order], atol=atol, rtol=0)
            np.testing.assert_allclose(want[row, position, top_ids], top_lp, atol=atol, rtol=0)
        chosen = want[row, n - 1, candidate_ids]
        np.testing.assert_allclose(got.candidate_logprobs, chosen, atol=atol, rtol=0)
        np.testing.assert_allclose(got.candidate_probs, np.exp(chosen) / np.exp(chosen).sum(),
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def score_service(ray_session, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps(API_KEYS))
    config = ServiceConfig(
        worker=WorkerSpec(preset=str(FIXTURE), mesh_shape=(1, 2), batching=BATCHING,
                          max_adapters=2, max_adapter_rank=8,
                          compilation_cache_dir=os.environ["GEMMA_SERVE_TEST_COMPILATION_CACHE"]),
        num_workers=1, host="127.0.0.1", port=0,
        data_dir=str(tmp_path_factory.mktemp("data")), api_keys_file=str(keys_file),
        max_upload_bytes=1 << 20)
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def acme(score_service):
    with GemmaClient(score_service.address, api_key=ACME_KEY) as client:
        client.upload_adapter("tuned", FIXTURE / "adapter.lora.h5")
        yield client


def lora_logits():
    """The fixture's keras_hub hidden states with its adapter, through the
    tied embedding (Gemma 1 has no final soft cap), in numpy."""
    embedding = GemmaBackbone.from_preset(FIXTURE).token_embedding.get_weights()[0]
    return reference("gemma1_tiny")["hidden_states_with_lora"].astype(np.float64) @ embedding.T


ASK = dict(token_logprobs=True, top_k=5, top_k_positions=[-1, 0, 3], candidates=[3, 17, 200])


def test_scores_equal_numpy_on_the_fixture_with_and_without_an_adapter(acme):
    base = acme.score(token_ids=sequences(), **ASK)
    assert base.candidate_ids == [3, 17, 200] and base.adapter_id == ""
    check_scores(base, reference("gemma1_tiny")["logits"], 5, [-1, 0, 3], [3, 17, 200])
    tuned = acme.score(token_ids=sequences(), adapter_id="tuned", **ASK)
    assert tuned.adapter_id == "tuned@1"
    check_scores(tuned, lora_logits(), 5, [-1, 0, 3], [3, 17, 200])
    # Only what was asked comes back.
    only = acme.score(token_ids=sequences(), candidates=[5, 6])
    assert only.sequences[0].token_logprobs is None and only.sequences[0].top_tokens == []
    np.testing.assert_allclose(only.sequences[0].candidate_probs.sum(), 1.0, atol=1e-6)


def test_score_and_forward_share_batches_and_compile_nothing(score_service, acme):
    before = operator_worker_infos(score_service)[0]
    assert int(before["compiled_functions"]) == 2 * len(BATCHING.shapes())
    base_scores = acme.score(token_ids=sequences(), **ASK)
    tuned_scores = acme.score(token_ids=sequences(), adapter_id="tuned", **ASK)
    hidden = acme.forward(token_ids=sequences(), layers=[1, -1]).hidden_states

    def one(kind):
        if kind == "forward":
            return acme.forward(token_ids=sequences(), layers=[1, -1]).hidden_states
        return acme.score(token_ids=sequences(), adapter_id="tuned" if kind == "tuned" else "",
                          **ASK)

    kinds = ["forward", "base", "tuned"] * 4
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        for kind, got in zip(kinds, pool.map(one, kinds)):
            if kind == "forward":
                for g_row, w_row in zip(got, hidden):
                    for g, w in zip(g_row, w_row):
                        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
                continue
            want = base_scores if kind == "base" else tuned_scores
            for g, w in zip(got.sequences, want.sequences):
                np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=1e-5)
                np.testing.assert_allclose(g.candidate_logprobs, w.candidate_logprobs,
                                           atol=1e-5)
                for (_, _, g_lp), (_, _, w_lp) in zip(g.top_tokens, w.top_tokens):
                    np.testing.assert_allclose(g_lp, w_lp, atol=1e-5)
    after = operator_worker_infos(score_service)[0]
    assert int(after["compiled_functions"]) == int(before["compiled_functions"])
    assert int(after["programs_compiled"]) == int(before["programs_compiled"])
    assert int(after["max_sequences_in_a_batch"]) > 2  # requests shared batches


@pytest.mark.parametrize("ask, field, words", [
    (dict(), "token_logprobs, top_k, candidate_ids", "nothing to score"),
    (dict(top_k=21), "top_k", "0..20"),
    (dict(top_k=2, top_k_positions=[10]), "top_k_positions", "outside sequence 1"),
    (dict(top_k=2, top_k_positions=[-1, 8]), "top_k_positions", "twice"),
    (dict(top_k_positions=[0]), "top_k_positions", "set top_k"),
    (dict(top_k=1, top_k_positions=list(range(17))), "top_k_positions", "at most 16"),
    (dict(candidates=[4, 4]), "candidate_ids", "distinct"),
    (dict(candidates=[256]), "candidate_ids", "outside [0, 256)"),
    (dict(candidates=list(range(65))), "candidate_ids", "at most 64"),
    (dict(candidates=["yes"]), "candidates", "no tokenizer"),
])
def test_bad_score_requests_are_refused_with_the_field_to_fix(acme, ask, field, words):
    with pytest.raises(grpc.RpcError) as error:
        acme.score(token_ids=sequences(), **ask)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details() and words in error.value.details()


def test_an_answer_too_big_for_one_message_is_refused_up_front():
    from coordinator.errors import InvalidArgument
    from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
    from coordinator.score_request import MAX_RESPONSE_BYTES, parse_score_request
    from coordinator.service_config import ServiceLimits

    limits = ServiceLimits(vocabulary_size=256, num_layers=2, hidden_dim=64,
                           max_sequence_length=8192)
    def request(count):
        return pb.ScoreRequest(token_logprobs=True, sequences=[
            pb.TokenSequence(ids=[1] * 8192) for _ in range(count)])
    fits = MAX_RESPONSE_BYTES // (8192 * 9)
    assert len(parse_score_request(request(fits), limits, None, "r", None).sequences) == fits
    with pytest.raises(InvalidArgument, match="fewer or shorter"):
        parse_score_request(request(fits + 1), limits, None, "r", None)


def test_an_unknown_adapter_is_not_found(acme):
    with pytest.raises(grpc.RpcError) as error:
        acme.score(token_ids=sequences(), candidates=[1], adapter_id="nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
