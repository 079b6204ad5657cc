"""An asyncio client for many concurrent calls from one thread."""

from __future__ import annotations

from typing import Sequence

import grpc
from google.protobuf import json_format

from coordinator.client import (ForwardResult, ScoreResult, assemble, forward_request,
                               score_request, score_result)
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc


class AsyncGemmaClient:
    """`GemmaClient`'s forward, score and model_info as coroutines, over one
    `grpc.aio` channel. Many calls in flight cost one event loop instead of a
    thread each (a blocking client per thread pays for the threads' hand-offs
    of the interpreter lock: up to twice the CPU per call).

    >>> async with AsyncGemmaClient("127.0.0.1:50051") as client:
    ...     results = await asyncio.gather(*(client.forward(texts=[t]) for t in texts))
    """

    def __init__(self, target: str, *, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials
                         else grpc.aio.insecure_channel(target))
        self._stub = pb_grpc.GemmaServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def forward(self, texts: Sequence[str] | None = None,
                      token_ids: Sequence[Sequence[int]] | None = None, *,
                      layers: Sequence[int] = (), pooling: str = "none",
                      dtype: str = "float32", adapter_id: str = "",
                      add_bos: bool | None = None, truncate: str | None = None,
                      dimensions: int = 0, normalize: bool = False,
                      timeout: float | None = None) -> ForwardResult:
        """As `GemmaClient.forward`; cancelling the awaiting task cancels the call."""
        request = forward_request(texts, token_ids, layers=layers, pooling=pooling,
                                  dtype=dtype, adapter_id=adapter_id, add_bos=add_bos,
                                  truncate=truncate, dimensions=dimensions,
                                  normalize=normalize)
        call = self._stub.Forward(request, timeout=timeout, metadata=self._metadata)
        return assemble([response async for response in call])

    async def score(self, texts: Sequence[str] | None = None,
                    token_ids: Sequence[Sequence[int]] | None = None, *,
                    token_logprobs: bool = False, top_k: int = 0,
                    top_k_positions: Sequence[int] = (), candidates: Sequence[str | int] = (),
                    adapter_id: str = "", add_bos: bool | None = None,
                    truncate: str | None = None, timeout: float | None = None) -> ScoreResult:
        """As `GemmaClient.score`."""
        request = score_request(texts, token_ids, token_logprobs=token_logprobs, top_k=top_k,
                                top_k_positions=top_k_positions, candidates=candidates,
                                adapter_id=adapter_id, add_bos=add_bos, truncate=truncate)
        response = await self._stub.Score(request, timeout=timeout, metadata=self._metadata)
        return score_result(response, token_logprobs)

    async def model_info(self, timeout: float | None = None) -> dict:
        info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                             metadata=self._metadata)
        return json_format.MessageToDict(info, preserving_proto_field_name=True)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncGemmaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
