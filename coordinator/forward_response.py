"""A worker's result as a stream: one header, then chunks under 4 MiB."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from coordinator.forward_request import DTYPE_NAMES, POOLING_NAMES
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.forward_work import ForwardResult, ForwardWork

_POOLING_ENUM = {name: value for value, name in POOLING_NAMES.items() if value}
_DTYPE_ENUM = {name: value for value, name in DTYPE_NAMES.items() if value}


def little_endian_bytes(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes, whatever the host's byte order."""
    width = array.dtype.itemsize
    return np.ascontiguousarray(array).view(f"u{width}").astype(f"<u{width}").tobytes()


def response_stream(work: ForwardWork, result: ForwardResult, model: str, hidden_dim: int,
                    chunk_bytes: int, adapter_id: str = "") -> Iterator[pb.ForwardResponse]:
    dtype = _DTYPE_ENUM[work.dtype]
    header = pb.ForwardHeader(
        request_id=work.request_id, model=model, layers=work.layers,
        pooling=_POOLING_ENUM[work.pooling], dtype=dtype, hidden_dim=hidden_dim,
        total_bytes=sum(t.nbytes for per_layer in result.tensors for t in per_layer),
        worker_id=result.worker_id, adapter_id=adapter_id,
        dimensions=work.dimensions or hidden_dim, normalized=work.normalize)
    truncated = work.truncated or (0,) * len(work.sequences)
    for ids, per_layer, dropped in zip(work.sequences, result.tensors, truncated):
        header.sequences.add(token_ids=ids.tolist(), shape=per_layer[0].shape,
                             truncated_tokens=dropped)
    yield pb.ForwardResponse(header=header)
    for index, per_layer in enumerate(result.tensors):
        for layer, tensor in zip(work.layers, per_layer):
            if tensor.ndim == 1:  # pooled: one small chunk
                yield pb.ForwardResponse(chunk=pb.TensorChunk(
                    sequence_index=index, layer=layer, token_offset=0, shape=tensor.shape,
                    dtype=dtype, data=little_endian_bytes(tensor)))
                continue
            rows = max(1, chunk_bytes // (tensor.shape[1] * tensor.dtype.itemsize))
            for start in range(0, tensor.shape[0], rows):
                part = tensor[start:start + rows]
                yield pb.ForwardResponse(chunk=pb.TensorChunk(
                    sequence_index=index, layer=layer, token_offset=start,
                    shape=part.shape, dtype=dtype, data=little_endian_bytes(part)))
