"""Tokenize over gRPC: the ids Forward sees, texts back, Forward's own limits."""

import grpc
import pytest

from service_support import ACME_KEY, keyed_channel
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé ✓ and emoji 🦊", "Hi"]


def test_texts_give_the_ids_forward_runs_and_come_back(client, local_model):
    _, tokenizer = local_model
    ids = client.tokenize(TEXTS)
    assert ids == [tokenizer.tokenize(t, add_bos=True) for t in TEXTS]
    assert client.tokenize(TEXTS, add_bos=False) == [tokenizer.tokenize(t) for t in TEXTS]
    forwarded = client.forward(texts=TEXTS)
    assert [list(t) for t in forwarded.token_ids] == ids
    assert client.detokenize([i[1:] for i in ids]) == TEXTS


def test_cli_tokenizes_and_decodes(service, local_model, capsys):
    from coordinator import client_cli
    _, tokenizer = local_model
    client_cli.main(["--target", service.address, "--api-key", ACME_KEY, "tokenize",
                     "--text", "Hi there"])
    ids = tokenizer.tokenize("Hi there", add_bos=True)
    assert capsys.readouterr().out.strip() == f"{len(ids)} tokens: {','.join(map(str, ids))}"
    client_cli.main(["--target", service.address, "--api-key", ACME_KEY, "tokenize",
                     "--ids", ",".join(map(str, ids[1:]))])
    assert capsys.readouterr().out.strip() == '"Hi there"'


@pytest.mark.parametrize("request_, field", [
    (pb.TokenizeRequest(), "texts, sequences"),
    (pb.TokenizeRequest(texts=["a"], sequences=[pb.TokenSequence(ids=[1])]), "not both"),
    (pb.TokenizeRequest(texts=[""]), "texts[0]: is empty"),
    (pb.TokenizeRequest(texts=["x" * 20000]), "texts[0]: is 20000 bytes"),
    (pb.TokenizeRequest(texts=["a"] * 33), "33 items"),
    (pb.TokenizeRequest(sequences=[pb.TokenSequence(ids=[5, -1])]), "position 1"),
    (pb.TokenizeRequest(sequences=[pb.TokenSequence(ids=[1 << 20])]), "outside [0,"),
    (pb.TokenizeRequest(sequences=[pb.TokenSequence(ids=[1])], add_bos=True), "add_bos"),
])
def test_bad_requests_are_invalid_argument(service, request_, field):
    with keyed_channel(service.address, ACME_KEY) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GemmaServiceStub(channel).Tokenize(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


def test_a_wrong_key_is_unauthenticated(service):
    with keyed_channel(service.address, "not-a-key") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GemmaServiceStub(channel).Tokenize(pb.TokenizeRequest(texts=["a"]),
                                                       timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
