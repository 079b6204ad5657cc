"""Score requests: proto in, validated work out, and the answer back.

A Score request runs as forward work whose rows carry a `ScoreSpec`: the
same queue, batches and adapters as Forward; the worker reads the head at
the final layer (worker/batch.py) and only the scores come back.
"""

from __future__ import annotations

import numpy as np

from coordinator.errors import InvalidArgument
from coordinator.forward_request import check_id_range, parse_sequences
from coordinator.forward_work import ForwardResult, ForwardWork
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer
from gemma_core.token_scores import MAX_CANDIDATES, MAX_TOP_K_POSITIONS, max_top_k
from worker.score_picks import ScoreSpec

# A unary answer stays under gRPC's default 4 MiB message limit: what it
# would hold is estimated (bytes per value, varints at their widest) and a
# request past this is refused before it runs.
MAX_RESPONSE_BYTES = 3 << 20
_ID_BYTES, _LOGPROB_BYTES = 5, 4
# A candidate text is one token: a few dozen bytes at most. The limit keeps
# tokenizing candidates on the event loop cheap.
MAX_CANDIDATE_BYTES = 256


def _candidate_ids(message: pb.ScoreRequest, limits: ServiceLimits,
                   tokenizer: GemmaTokenizer | None) -> tuple[int, ...]:
    if message.candidate_ids and message.candidates:
        raise InvalidArgument("candidate_ids, candidates", "send candidates as ids or as "
                                                            "texts, not both.")
    field = "candidates" if message.candidates else "candidate_ids"
    count = len(message.candidates) or len(message.candidate_ids)
    if count > MAX_CANDIDATES:
        raise InvalidArgument(field, f"{count} candidates; at most {MAX_CANDIDATES}.")
    if message.candidates:
        if tokenizer is None:
            raise InvalidArgument("candidates", "this model has no tokenizer; send "
                                                "candidate_ids instead.")
        ids = []
        for i, text in enumerate(message.candidates):
            if len(text.encode("utf-8")) > MAX_CANDIDATE_BYTES:
                raise InvalidArgument(f"candidates[{i}]", f"is over {MAX_CANDIDATE_BYTES} "
                                      "bytes; each candidate must be exactly one token.")
            tokens = tokenizer.tokenize(text, add_bos=False) if text else []
            if len(tokens) != 1:
                raise InvalidArgument(f"candidates[{i}]", f"{text!r} is {len(tokens)} tokens; "
                                      "each candidate must be exactly one token (Tokenize "
                                      "shows how a text splits).")
            ids.append(int(tokens[0]))
    else:
        ids = list(message.candidate_ids)
        check_id_range(np.asarray(ids, "int64"), "candidate_ids", limits)
    if len(set(ids)) != len(ids):
        raise InvalidArgument(field, f"names a token twice ({ids}); candidates must be "
                                     "distinct.")
    return tuple(ids)


def _positions(requested, length: int, index: int) -> tuple[int, ...]:
    """`requested` top-k positions normalized for a sequence of `length`."""
    normalized = []
    for position in requested:
        if not -length <= position < length:
            raise InvalidArgument("top_k_positions", f"{position} is outside sequence {index} "
                                  f"({length} tokens: use 0..{length - 1} or -{length}..-1).")
        normalized.append(position % length)
    return tuple(normalized)


def parse_score_request(message: pb.ScoreRequest, limits: ServiceLimits,
                        tokenizer: GemmaTokenizer | None, request_id: str,
                        timeout_s: float | None) -> ForwardWork:
    """Validates `message` and turns it into the work a worker runs (its
    adapter_id is resolved by the caller, as for Forward).

    Raises:
        InvalidArgument: naming the field at fault.
    """
    most = max_top_k(limits.vocabulary_size)
    if not 0 <= message.top_k <= most:
        raise InvalidArgument("top_k", f"{message.top_k} is outside 0..{most}.")
    requested = list(message.top_k_positions) or [-1]
    if message.top_k_positions and not message.top_k:
        raise InvalidArgument("top_k_positions", "set top_k too: how many tokens to list "
                                                 "at each position.")
    if len(requested) > MAX_TOP_K_POSITIONS:
        raise InvalidArgument("top_k_positions", f"{len(requested)} positions; at most "
                                                  f"{MAX_TOP_K_POSITIONS}.")
    candidates = _candidate_ids(message, limits, tokenizer)
    if not (message.token_logprobs or message.top_k or candidates):
        raise InvalidArgument("token_logprobs, top_k, candidate_ids", "nothing to score; ask "
                              "for token_logprobs, a top_k, or candidates.")
    ids, truncated = parse_sequences(message, limits, tokenizer)
    specs = []
    for index, sequence in enumerate(ids):
        positions = _positions(requested, len(sequence), index) if message.top_k else ()
        if len(set(positions)) != len(positions):
            raise InvalidArgument("top_k_positions", f"name a position of sequence {index} "
                                                     f"twice ({positions}).")
        specs.append(ScoreSpec(token_logprobs=message.token_logprobs, top_k=message.top_k,
                               positions=positions, candidates=candidates))
    size = sum(len(s) * (_ID_BYTES + _LOGPROB_BYTES * message.token_logprobs)
               + len(spec.positions) * spec.top_k * (_ID_BYTES + _LOGPROB_BYTES)
               + len(candidates) * 2 * _LOGPROB_BYTES for s, spec in zip(ids, specs))
    if size > MAX_RESPONSE_BYTES:
        raise InvalidArgument("sequences" if message.sequences else "texts",
                              f"the scores would take about {size >> 10} KiB, over the "
                              f"{MAX_RESPONSE_BYTES >> 10} KiB one answer may hold; send "
                              "fewer or shorter sequences per request.")
    return ForwardWork(request_id=request_id, sequences=ids, layers=(limits.num_layers,),
                       timeout_s=timeout_s, truncated=truncated, scores=tuple(specs))


def score_response(work: ForwardWork, result: ForwardResult, model: str,
                   adapter_id: str) -> pb.ScoreResponse:
    response = pb.ScoreResponse(request_id=work.request_id, model=model, adapter_id=adapter_id,
                                worker_id=result.worker_id,
                                candidate_ids=work.scores[0].candidates)
    truncated = work.truncated or (0,) * len(work.sequences)
    for ids, spec, scores, dropped in zip(work.sequences, work.scores, result.tensors,
                                          truncated, strict=True):
        sequence = response.sequences.add(token_ids=ids.tolist(), truncated_tokens=dropped)
        if scores.token_logprobs is not None:
            sequence.token_logprobs.extend(scores.token_logprobs.tolist())
        for p, position in enumerate(spec.positions):
            sequence.top_tokens.add(position=position, ids=scores.top_ids[p].tolist(),
                                    logprobs=scores.top_logprobs[p].tolist())
        if scores.candidate_logprobs is not None:
            sequence.candidate_logprobs.extend(scores.candidate_logprobs.tolist())
            sequence.candidate_probs.extend(scores.candidate_probs.tolist())
    return response
