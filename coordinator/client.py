"""A Python client: requests in, numpy arrays out.

Example:
>>> with GemmaClient("127.0.0.1:50051") as client:
...     result = client.forward(texts=["Hello"], layers=[-1], pooling="mean")
...     result.hidden_states[0][0].shape          # (hidden_dim,)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grpc
import ml_dtypes
import numpy as np
from google.protobuf import json_format

from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc

_POOLING = {"none": pb.POOLING_NONE, "last_token": pb.POOLING_LAST_TOKEN,
            "mean": pb.POOLING_MEAN}
_DTYPE = {"float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16,
          "float16": pb.DTYPE_FLOAT16}
_NUMPY = {pb.DTYPE_FLOAT32: np.dtype(np.float32), pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
          pb.DTYPE_FLOAT16: np.dtype(np.float16)}


class IncompleteResponse(RuntimeError):
    """The stream ended before every announced tensor arrived."""


@dataclasses.dataclass
class ForwardResult:
    """`hidden_states[i][j]`: sequence i at layer `layers[j]`."""

    request_id: str
    model: str
    worker_id: str
    layers: list[int]
    token_ids: list[np.ndarray]
    hidden_states: list[list[np.ndarray]]

    def layer(self, layer: int) -> list[np.ndarray]:
        """Every sequence's tensor at one (normalized) layer index."""
        j = self.layers.index(layer)
        return [per_layer[j] for per_layer in self.hidden_states]


def assemble(responses) -> ForwardResult:
    """Reassembles a Forward stream into arrays, checking it is complete."""
    stream = iter(responses)
    first = next(stream, None)
    if first is None or first.WhichOneof("kind") != "header":
        raise IncompleteResponse("the stream did not start with a header")
    header = first.header
    dtype = _NUMPY[header.dtype]
    layers = list(header.layers)
    tensors = [[np.empty(tuple(info.shape), dtype) for _ in layers] for info in header.sequences]
    received = 0
    for response in stream:
        chunk = response.chunk
        target = tensors[chunk.sequence_index][layers.index(chunk.layer)]
        width = dtype.itemsize  # the wire is little-endian; match the host
        data = (np.frombuffer(chunk.data, f"<u{width}").astype(f"=u{width}", copy=False)
                .view(dtype).reshape(tuple(chunk.shape)))
        if target.ndim == 1:
            target[...] = data
        else:
            target[chunk.token_offset:chunk.token_offset + data.shape[0]] = data
        received += len(chunk.data)
    if received != header.total_bytes:
        raise IncompleteResponse(f"received {received} of {header.total_bytes} bytes")
    return ForwardResult(
        request_id=header.request_id, model=header.model, worker_id=header.worker_id,
        layers=layers, token_ids=[np.asarray(s.token_ids, "int32") for s in header.sequences],
        hidden_states=tensors)


class GemmaClient:
    """Blocking client over one channel. Default gRPC message limits suffice:
    responses stream in chunks under 4 MiB."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self._channel = (grpc.secure_channel(target, credentials) if credentials
                         else grpc.insecure_channel(target))
        self._stub = pb_grpc.GemmaServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def forward(self, texts: Sequence[str] | None = None,
                token_ids: Sequence[Sequence[int]] | None = None, *,
                layers: Sequence[int] = (), pooling: str = "none", dtype: str = "float32",
                adapter_id: str = "", add_bos: bool | None = None,
                timeout: float | None = None) -> ForwardResult:
        request = pb.ForwardRequest(
            texts=texts or [], layers=layers, pooling=_POOLING[pooling], dtype=_DTYPE[dtype],
            adapter_id=adapter_id,
            sequences=[pb.TokenSequence(ids=list(map(int, ids))) for ids in token_ids or []])
        if add_bos is not None:
            request.add_bos = add_bos
        return assemble(self._stub.Forward(request, timeout=timeout, metadata=self._metadata))

    def model_info(self, timeout: float | None = None) -> dict:
        info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                       metadata=self._metadata)
        return json_format.MessageToDict(info, preserving_proto_field_name=True)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GemmaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
