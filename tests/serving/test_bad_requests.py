"""Each kind of bad request gets its status code and a message naming the
field; the service keeps serving correct answers afterwards."""

import grpc
import numpy as np
import pytest

from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def seq(*ids):
    return pb.TokenSequence(ids=list(ids))


CASES = {
    "empty request": (pb.ForwardRequest(), INVALID, "nothing to run"),
    "both texts and ids": (pb.ForwardRequest(texts=["a"], sequences=[seq(1)]), INVALID,
                           "not both"),
    "empty sequence": (pb.ForwardRequest(sequences=[seq(2, 3), seq()]), INVALID,
                       "sequences[1]: is empty"),
    "empty text": (pb.ForwardRequest(texts=["ok", ""]), INVALID, "texts[1]: is empty"),
    "sequence too long": (pb.ForwardRequest(sequences=[seq(*([5] * 1025))]), INVALID,
                          "sequences[0]: has 1025 tokens; the limit is 1024"),
    "text too long in tokens": (pb.ForwardRequest(texts=["word " * 1500]), INVALID,
                                "texts[0] (tokenized): has"),
    "text too many bytes": (pb.ForwardRequest(texts=["x" * 20000]), INVALID,
                            "texts[0]: is 20000 bytes; the limit is 16384"),
    "id above vocabulary": (pb.ForwardRequest(sequences=[seq(2, 1024)]), INVALID,
                            "token id 1024 at position 1 is outside [0, 1024)"),
    "negative id": (pb.ForwardRequest(sequences=[seq(-3)]), INVALID,
                    "token id -3 at position 0"),
    "too many sequences": (pb.ForwardRequest(sequences=[seq(1)] * 33), INVALID,
                           "33 items; at most 32"),
    "unknown pooling": (pb.ForwardRequest(sequences=[seq(1)], pooling=9), INVALID,
                        "pooling: unknown value 9"),
    "unknown dtype": (pb.ForwardRequest(sequences=[seq(1)], dtype=7), INVALID,
                      "dtype: unknown value 7"),
    "layer too high": (pb.ForwardRequest(sequences=[seq(1)], layers=[5]), INVALID,
                       "layers[0]: 5 is out of range for a 4-layer model"),
    "layer too low": (pb.ForwardRequest(sequences=[seq(1)], layers=[0, -6]), INVALID,
                      "layers[1]: -6 is out of range"),
    "duplicate layer": (pb.ForwardRequest(sequences=[seq(1)], layers=[4, -1]), INVALID,
                        "names a layer twice"),
    "too many layers": (pb.ForwardRequest(sequences=[seq(1)], layers=[0, 1, 2, 3, 4, -2]),
                        INVALID, "6 layers requested; at most 5"),
    "add_bos with ids": (pb.ForwardRequest(sequences=[seq(1)], add_bos=True), INVALID,
                         "add_bos: applies to texts only"),
    "unknown adapter": (pb.ForwardRequest(sequences=[seq(1)], adapter_id="tenant-x/nope"),
                        grpc.StatusCode.NOT_FOUND, "no adapter 'tenant-x/nope'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_request(stub, client, name):
    request, code, message = CASES[name]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Forward(request, timeout=30))
    assert raised.value.code() == code, raised.value.details()
    assert message in raised.value.details()
    # Still serving, and correctly.
    result = client.forward(token_ids=[[2, 10, 20]], pooling="mean")
    assert np.isfinite(result.hidden_states[0][0]).all()


def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/gemma.v1.GemmaService/NoSuchMethod",
                               request_serializer=lambda m: b"",
                               response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as raised:
        call(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
