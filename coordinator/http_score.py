"""POST /v1/score: the Score RPC over HTTP, its JSON in and out.

The body takes `model` and `input` as /v1/embeddings does (the base model
or one of the caller's adapters; a string, strings, token ids, or arrays of
token ids), and the ScoreRequest's options under their proto names:
`token_logprobs`, `top_k`, `top_k_positions`, `add_bos`, and `candidates`
(strings, each one token, or token ids: the proto's `candidates` and
`candidate_ids` in one), `truncation` ("start" / "end"). The answer is the
ScoreResponse as proto JSON (proto field names), plus OpenAI-style `usage`.
Validation past the JSON types is Score's own (coordinator/score_request.py).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from coordinator.errors import InvalidArgument
from coordinator.forward_request import TRUNCATIONS
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.openai_embeddings import check_int32, is_id, parse_input

FIELDS = ("model", "input", "token_logprobs", "top_k", "top_k_positions", "candidates",
          "add_bos", "truncation")
_TRUNCATION_VALUES = {name: value for value, name in TRUNCATIONS.items()}


def score_request(body: Any, adapter_id: str) -> pb.ScoreRequest:
    """The ScoreRequest for a body already parsed from JSON.

    Raises:
        InvalidArgument: naming the parameter at fault.
    """
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object.")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown parameter; this endpoint takes "
                                          f"{', '.join(FIELDS)}.")
    if "input" not in body:
        raise InvalidArgument("input", "is required.")
    texts, sequences = parse_input(body["input"])
    token_logprobs = body.get("token_logprobs", False)
    if not isinstance(token_logprobs, bool):
        raise InvalidArgument("token_logprobs", "must be true or false.")
    top_k = body.get("top_k", 0)
    if not is_id(top_k):
        raise InvalidArgument("top_k", "must be an integer.")
    positions = body.get("top_k_positions", [])
    if not isinstance(positions, list) or not all(is_id(p) for p in positions):
        raise InvalidArgument("top_k_positions", "must be an array of integers.")
    candidates = body.get("candidates", [])
    as_ids = isinstance(candidates, list) and all(is_id(c) for c in candidates)
    if not isinstance(candidates, list) or not (
            as_ids or all(isinstance(c, str) for c in candidates)):
        raise InvalidArgument("candidates", "must be an array of strings (each one token) or "
                                            "of token ids.")
    truncation = body.get("truncation")
    if truncation not in _TRUNCATION_VALUES:
        raise InvalidArgument("truncation", f"{truncation!r} is not \"start\" or \"end\".")
    add_bos = body.get("add_bos")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise InvalidArgument("add_bos", "must be true or false.")
    check_int32(top_k, "top_k")
    for position in positions:
        check_int32(position, "top_k_positions")
    for candidate in candidates if as_ids else ():
        check_int32(candidate, "candidates")
    request = pb.ScoreRequest(
        texts=texts, sequences=[pb.TokenSequence(ids=ids) for ids in sequences],
        adapter_id=adapter_id, token_logprobs=token_logprobs, top_k=top_k,
        top_k_positions=positions, candidate_ids=candidates if as_ids else [],
        candidates=[] if as_ids else candidates, truncation=_TRUNCATION_VALUES[truncation])
    if add_bos is not None:
        request.add_bos = add_bos
    return request


def response(message: pb.ScoreResponse, model: str) -> dict:
    """The ScoreResponse as JSON, `model` as the caller named it."""
    payload = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    payload["model"] = model
    tokens = sum(len(s.token_ids) for s in message.sequences)
    payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return payload
