"""OpenAI's embeddings API on Forward: its JSON in, its JSON out.

A request becomes a ForwardRequest for the final layer, mean-pooled and
L2-normalized (what embedding clients expect), shortened to `dimensions`
first when asked; its rules and limits are then Forward's own, checked by
forward_request. Each rule here names OpenAI's parameter, so the error's
`param` points at it.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from coordinator.errors import InvalidArgument
from coordinator.forward_response import little_endian_bytes
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb

ENCODINGS = ("float", "base64")


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int32(value: int, param: str) -> int:
    """`value` as the proto's int32 fields take it, else an error naming
    `param` (protobuf itself would raise a ValueError: a 500)."""
    if not -2**31 <= value < 2**31:
        raise InvalidArgument(param, f"{value} does not fit a 32-bit integer.")
    return value


def parse_input(value: Any) -> tuple[list[str], list[list[int]]]:
    """OpenAI's four input forms -> (texts, token sequences), one non-empty;
    ids checked to fit int32 (their range is Forward's to check)."""
    if isinstance(value, str):
        return [value], []
    if not isinstance(value, list) or not value:
        raise InvalidArgument("input", "must be a string, a non-empty array of strings, an "
                                       "array of token ids, or an array of such arrays.")
    if all(isinstance(item, str) for item in value):
        return value, []
    if all(is_id(item) for item in value):
        return [], [[check_int32(i, "input") for i in value]]
    if all(isinstance(item, list) and item and all(is_id(i) for i in item) for item in value):
        return [], [[check_int32(i, "input") for i in item] for item in value]
    raise InvalidArgument("input", "mixes kinds or holds something else: send strings, or "
                                   "token ids (integers), or arrays of token ids; not empty.")


def forward_request(body: Any, adapter_id: str) -> tuple[pb.ForwardRequest, str]:
    """(the ForwardRequest, the encoding asked for) for an embeddings body
    already parsed from JSON; `adapter_id` is the adapter `model` named
    ("" for the base model).

    Raises:
        InvalidArgument: naming OpenAI's parameter at fault.
    """
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object.")
    unknown = sorted(set(body) - {"input", "model", "encoding_format", "dimensions", "user"})
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown parameter; this endpoint takes input, "
                                          "model, encoding_format, dimensions and user.")
    if "input" not in body:
        raise InvalidArgument("input", "is required.")
    texts, sequences = parse_input(body["input"])
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidArgument("encoding_format", f"{encoding!r} is not one of {ENCODINGS}.")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not is_id(dimensions) or dimensions < 1):
        raise InvalidArgument("dimensions", f"{dimensions!r} is not a positive integer.")
    if dimensions is not None:
        check_int32(dimensions, "dimensions")
    if "user" in body and not isinstance(body["user"], str):
        raise InvalidArgument("user", "must be a string.")
    return pb.ForwardRequest(
        texts=texts, sequences=[pb.TokenSequence(ids=ids) for ids in sequences],
        adapter_id=adapter_id, layers=[-1], pooling=pb.POOLING_MEAN, dtype=pb.DTYPE_FLOAT32,
        dimensions=dimensions or 0, normalize=True), encoding


def response(vectors: list[np.ndarray], token_ids: list[np.ndarray], model: str,
             encoding: str) -> dict:
    """OpenAI's embeddings response for the pooled float32 `vectors`."""
    data = []
    for index, vector in enumerate(vectors):
        embedding = (base64.b64encode(little_endian_bytes(vector.astype(np.float32))).decode()
                     if encoding == "base64" else vector.astype(float).tolist())
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = int(sum(len(ids) for ids in token_ids))
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
