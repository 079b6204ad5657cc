"""Forward requests: proto in, validated plain data out.

The one place a ForwardRequest message is read. Every rule names the field
to fix, so a client in any language can act on the message alone.
"""

from __future__ import annotations

import numpy as np

from coordinator.errors import InvalidArgument
from coordinator.forward_work import ForwardWork
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer, LayerIndexError, normalize_layer_index

POOLING_NAMES = {pb.POOLING_UNSPECIFIED: "none", pb.POOLING_NONE: "none",
                 pb.POOLING_LAST_TOKEN: "last_token", pb.POOLING_MEAN: "mean"}
DTYPE_NAMES = {pb.DTYPE_UNSPECIFIED: "float32", pb.DTYPE_FLOAT32: "float32",
               pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_FLOAT16: "float16"}
TRUNCATIONS = {pb.TRUNCATION_UNSPECIFIED: None, pb.TRUNCATION_KEEP_START: "start",
               pb.TRUNCATION_KEEP_END: "end"}
# Texts of up to this many characters in all are tokenized on the event loop
# (a few milliseconds at most); longer ones beside it (coordinator/off_loop.py).
LOOP_TOKENIZE_CHARS = 16 << 10


def _enum(value: int, names: dict, field: str, enum) -> str:
    if value not in names:
        valid = ", ".join(enum.Name(v) for v in sorted(names))
        raise InvalidArgument(field, f"unknown value {value}; use one of {valid}.")
    return names[value]


def _layers(requested, limits: ServiceLimits) -> tuple[int, ...]:
    L = limits.num_layers
    layers = list(requested) or [-1]
    if len(layers) > limits.max_layers_per_request:
        raise InvalidArgument("layers", f"{len(layers)} layers requested; at most "
                                        f"{limits.max_layers_per_request} per request.")
    # The range rule and its wording are gemma_core's (layer_indices.py).
    normalized = []
    for position, index in enumerate(layers):
        try:
            normalized.append(normalize_layer_index(index, L))
        except LayerIndexError as error:
            raise InvalidArgument(f"layers[{position}]", error.reason) from None
    if len(set(normalized)) != len(normalized):
        raise InvalidArgument("layers", f"{list(layers)} names a layer twice.")
    return tuple(normalized)


def _truncate(ids: np.ndarray, keep: str | None, limit: int, keep_first: bool) -> np.ndarray:
    """The ids that fit `limit`: the first ones (keep "start") or the last
    ones (keep "end"; with `keep_first`, ids[0], a text's <bos>, stays in
    front); unchanged when they fit or no truncation was asked for."""
    if keep is None or ids.size <= limit:
        return ids
    if keep == "start":
        return ids[:limit]
    if keep_first:
        return np.concatenate([ids[:1], ids[ids.size - limit + 1:]])
    return ids[ids.size - limit:]


def _check_ids(ids: np.ndarray, field: str, limits: ServiceLimits) -> np.ndarray:
    if ids.size == 0:
        raise InvalidArgument(field, "is empty; send at least one token.")
    if ids.size > limits.max_sequence_length:
        raise InvalidArgument(field, f"has {ids.size} tokens; the limit is "
                                     f"{limits.max_sequence_length}. Send less, or set "
                                     "truncation to keep its start or its end.")
    check_id_range(ids, field, limits)
    return ids


def check_id_range(ids: np.ndarray, field: str, limits: ServiceLimits) -> None:
    """Every id in [0, vocabulary_size), else the first one that is not."""
    bad = (ids < 0) | (ids >= limits.vocabulary_size)
    if bad.any():
        position = int(np.argmax(bad))
        raise InvalidArgument(field, f"token id {int(ids[position])} at position {position} "
                                     f"is outside [0, {limits.vocabulary_size}).")


def check_count(count: int, field: str, limits: ServiceLimits) -> None:
    if count > limits.max_sequences_per_request:
        raise InvalidArgument(field, f"{count} items; at most "
                                     f"{limits.max_sequences_per_request} per request.")


def check_text(text: str, field: str, limits: ServiceLimits) -> None:
    """A text as the tokenizer may take it: not empty, within the byte limit."""
    if not text:
        raise InvalidArgument(field, "is empty.")
    size = len(text.encode("utf-8"))
    if size > limits.max_text_bytes:
        raise InvalidArgument(field, f"is {size} bytes; the limit is {limits.max_text_bytes} "
                                     "(truncation applies to tokens, after it). Send less "
                                     "text.")


def cheap_to_parse(message: pb.ForwardRequest, limits: ServiceLimits) -> bool:
    """Whether `parse_forward_request(message)` is quick enough for the event
    loop: token ids, short texts, or more texts than are allowed (refused
    before any is tokenized)."""
    texts = message.texts
    return (len(texts) > limits.max_sequences_per_request
            or sum(len(text) for text in texts) <= LOOP_TOKENIZE_CHARS)


def texts_or_sequences(message, limits: ServiceLimits) -> tuple[list, list, bool]:
    """(texts, sequences, add_bos) of a Forward, Score or Tokenize request:
    exactly one of texts and sequences, within the count limit; `add_bos`
    (default true) set only with texts.

    Raises:
        InvalidArgument: naming the field at fault.
    """
    texts, sequences = list(message.texts), list(message.sequences)
    if texts and sequences:
        raise InvalidArgument("texts, sequences", "send texts or token sequences, not both.")
    if not texts and not sequences:
        raise InvalidArgument("texts, sequences", "nothing to run; send texts or sequences.")
    check_count(len(texts) + len(sequences), "texts" if texts else "sequences", limits)
    if message.HasField("add_bos") and not texts:
        raise InvalidArgument("add_bos", "applies to texts only; token sequences are "
                                         "used exactly as sent.")
    return texts, sequences, message.add_bos if message.HasField("add_bos") else True


def parse_sequences(message, limits: ServiceLimits, tokenizer: GemmaTokenizer | None
                    ) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """The input of a Forward or Score request (`texts` or `sequences`,
    `add_bos`, `truncation`), validated: (int32 ids per sequence, tokens
    truncation dropped from each).

    Raises:
        InvalidArgument: naming the field at fault.
    """
    texts, sequences, add_bos = texts_or_sequences(message, limits)
    keep = _enum(message.truncation, TRUNCATIONS, "truncation", pb.Truncation)
    limit = limits.max_sequence_length
    ids, whole = [], []
    if texts:
        if tokenizer is None:
            raise InvalidArgument("texts", "this model has no tokenizer; send token "
                                           "sequences instead.")
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]", limits)
            tokens = np.asarray(tokenizer.tokenize(text, add_bos=add_bos), "int32")
            whole.append(tokens.size)
            ids.append(_check_ids(_truncate(tokens, keep, limit, keep_first=add_bos),
                                  f"texts[{i}] (tokenized)", limits))
    else:
        for i, s in enumerate(sequences):
            sent = np.asarray(s.ids, "int64")
            whole.append(sent.size)
            ids.append(_check_ids(_truncate(sent, keep, limit, keep_first=False),
                                  f"sequences[{i}]", limits).astype("int32"))
    return tuple(ids), tuple(n - kept.size for n, kept in zip(whole, ids))


def parse_forward_request(message: pb.ForwardRequest, limits: ServiceLimits,
                          tokenizer: GemmaTokenizer | None, request_id: str,
                          timeout_s: float | None) -> ForwardWork:
    """Validates `message` and turns it into the work a worker runs.

    `message.adapter_id` is left to the caller, which resolves it for the
    caller's tenant and sets `adapter` on the result.

    Raises:
        InvalidArgument: naming the field at fault.
    """
    pooling = _enum(message.pooling, POOLING_NAMES, "pooling", pb.Pooling)
    dtype = _enum(message.dtype, DTYPE_NAMES, "dtype", pb.DType)
    layers = _layers(message.layers, limits)
    if not 0 <= message.dimensions <= limits.hidden_dim:
        raise InvalidArgument("dimensions", f"{message.dimensions} is outside 0.."
                                            f"{limits.hidden_dim} (the model's hidden size; "
                                            "0 keeps every value).")
    ids, truncated = parse_sequences(message, limits, tokenizer)
    return ForwardWork(request_id=request_id, sequences=ids, layers=layers,
                       pooling=pooling, dtype=dtype, dimensions=message.dimensions,
                       normalize=message.normalize, timeout_s=timeout_s, truncated=truncated)
