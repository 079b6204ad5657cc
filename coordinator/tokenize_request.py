"""Tokenize: texts to ids and ids to texts, with Forward's own rules."""

from __future__ import annotations

import numpy as np

from coordinator.errors import FailedPrecondition, InvalidArgument
from coordinator.forward_request import (LOOP_TOKENIZE_CHARS, check_id_range, check_text,
                                         texts_or_sequences)
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer


def cheap_to_tokenize(message: pb.TokenizeRequest, limits: ServiceLimits) -> bool:
    """Whether `tokenize(message)` is quick enough for the event loop."""
    return (len(message.texts) + len(message.sequences) > limits.max_sequences_per_request
            or sum(len(text) for text in message.texts)
            + sum(len(s.ids) for s in message.sequences) <= LOOP_TOKENIZE_CHARS)


def tokenize(message: pb.TokenizeRequest, limits: ServiceLimits,
             tokenizer: GemmaTokenizer | None) -> pb.TokenizeResponse:
    """The TokenizeResponse for `message`.

    Raises:
        InvalidArgument: naming the field at fault.
        FailedPrecondition: the model has no tokenizer.
    """
    texts, sequences, add_bos = texts_or_sequences(message, limits)
    if tokenizer is None:
        raise FailedPrecondition("this model has no tokenizer; it serves token sequences "
                                 "only.")
    if texts:
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]", limits)
        return pb.TokenizeResponse(sequences=[
            pb.TokenSequence(ids=tokenizer.tokenize(text, add_bos=add_bos)) for text in texts])
    decoded = []
    for i, sequence in enumerate(sequences):
        ids = np.asarray(sequence.ids, "int64")
        if ids.size > limits.max_text_bytes:
            raise InvalidArgument(f"sequences[{i}]", f"has {ids.size} ids; at most "
                                                     f"{limits.max_text_bytes}.")
        check_id_range(ids, f"sequences[{i}]", limits)
        decoded.append(tokenizer.detokenize(ids.tolist()))
    return pb.TokenizeResponse(texts=decoded)
