"""Fine-tune requests and training data: proto in, validated plain data out.

The one place StartFineTuneRequest messages and uploaded datasets are read;
every rule names the field (or line) to fix. Parsing takes up to seconds of
CPU, so callers run it off the event loop (coordinator/off_loop.py) unless
`cheap_to_parse` says it is quick; it works in short steps (a text, a line, a sequence) so that the loop keeps
its turns meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Iterator

import numpy as np

from coordinator.adapter_record import check_name, shown
from coordinator.errors import InvalidArgument
from coordinator.forward_request import LOOP_TOKENIZE_CHARS
from coordinator.generated.gemma.v1 import finetune_service_pb2 as ft_pb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer
from gemma_core import lora_targets
from gemma_core.fine_tune_config import DEFAULT_TARGETS, FineTuneConfig
from gemma_core.lora_trainer import total_steps
from worker.packed_sequences import PackedSequences

DEFAULT_RANK = 8
DEFAULT_SEQUENCE_LENGTH = 128
MAX_STEPS = 1_000_000
MAX_TRAINING_SEQUENCES = 1_000_000
# Inline training data (StartFineTune texts or sequences): more goes through
# UploadDataset. The count is checked before any item is read, so an
# oversized request costs nothing but its decoding.
MAX_INLINE_SEQUENCES = 10_000
MAX_INLINE_TOKENS = 1_000_000
_UPLOAD_HINT = ("upload larger training data with UploadDataset (`gemma-client datasets "
                "upload NAME data.jsonl`) and start the job from its dataset_id.")


@dataclasses.dataclass(frozen=True)
class FineTuneRequest:
    """A validated StartFineTune: what to train, on what, from where.

    Attributes:
        adapter_name: the name the result is published under.
        config: the hyper-parameters.
        sequences: inline training data (token ids), or None with `dataset_id`.
        dataset_id: a stored dataset of the caller's, or "".
        initial_adapter_id: an adapter of the caller's to start from, or "".
    """

    adapter_name: str
    config: FineTuneConfig
    sequences: PackedSequences | None
    dataset_id: str
    initial_adapter_id: str


def training_ids(ids, field: str, limits: ServiceLimits) -> np.ndarray:
    """int32 ids of one training sequence, checked: at least 2 tokens (one
    prediction), all within the vocabulary."""
    try:
        array = np.asarray(ids, "int64").reshape(-1)
    except OverflowError:  # a JSON integer beyond int64: outside the vocabulary anyway
        array = None
    size = len(ids) if array is None else array.size
    if size < 2:
        raise InvalidArgument(field, f"has {size} token(s); a training sequence needs at "
                                     "least 2 (a token and the next one to predict).")
    if array is None:
        bad = [not 0 <= token < limits.vocabulary_size for token in ids]
    else:
        bad = (array < 0) | (array >= limits.vocabulary_size)
    if np.any(bad):
        position = int(np.argmax(bad))
        raise InvalidArgument(field, f"token id {shown(int(ids[position]))} at position "
                                     f"{position} is outside [0, {limits.vocabulary_size}).")
    return array.astype("int32")


def _tokenize(text: str, field: str, limits: ServiceLimits,
              tokenizer: GemmaTokenizer | None) -> np.ndarray:
    if tokenizer is None:
        raise InvalidArgument(field, "this model has no tokenizer; send token ids instead.")
    if not isinstance(text, str) or not text:
        raise InvalidArgument(field, "must be a non-empty string.")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:  # a lone surrogate from a JSON "\ud800" escape
        raise InvalidArgument(field, f"holds {text[error.start]!r} at character {error.start}, "
                                     "half of a surrogate pair, which is not text; send "
                                     "valid Unicode.") from None
    # One tokenizer call holds the GIL throughout: the same bound as Forward's.
    if size > limits.max_text_bytes:
        raise InvalidArgument(field, f"is {size} bytes; the limit is {limits.max_text_bytes} "
                                     "(--max-text-bytes). Training reads at most "
                                     "sequence_length tokens of it anyway; split long "
                                     "documents into several examples.")
    return training_ids(tokenizer.tokenize(text, add_bos=True), f"{field} (tokenized)", limits)


def max_line_bytes(limits: ServiceLimits) -> int:
    """The longest dataset line read: room for a text of `max_text_bytes`
    with every byte JSON-escaped (\\u00XX: 6 bytes) and for the ids of the
    longest sequence (up to 8 bytes each). Longer lines are refused before
    `json.loads`, one C call that holds the GIL throughout."""
    return 6 * limits.max_text_bytes + 8 * limits.max_sequence_length + 64


def parse_dataset_file(path: str | os.PathLike, limits: ServiceLimits,
                       tokenizer: GemmaTokenizer | None) -> PackedSequences:
    """JSON Lines, one {"text": "..."} or {"ids": [...]} per line, to token ids.

    Lines end at "\\n" only (as JSON Lines says), so a text may hold any other
    line separator; a UTF-8 byte order mark at the start is skipped. Read a
    line at a time: memory holds the result, not the file.

    Raises:
        InvalidArgument: naming the line at fault.
    """
    with open(path, "rb") as lines:
        sequences = PackedSequences.pack(_dataset_sequences(lines, limits, tokenizer))
    if not len(sequences):
        raise InvalidArgument("data", "holds no examples; send one JSON object per line.")
    return sequences


def _dataset_sequences(lines, limits: ServiceLimits,
                       tokenizer: GemmaTokenizer | None) -> Iterator[np.ndarray]:
    longest, count = max_line_bytes(limits), 0
    for number, raw in enumerate(iter(lambda: lines.readline(longest + 2), b""), start=1):
        field = f"data line {number}"
        raw = raw.removesuffix(b"\n")
        if len(raw) > longest:
            raise InvalidArgument(field, f"is longer than {longest} bytes, the most a line "
                                         "may hold here (a text of --max-text-bytes, or the "
                                         "ids of the longest sequence); split it.")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(field, f"is not UTF-8 JSON Lines ({error}).") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgument(field, f"is not JSON ({error.msg}).") from None
        except ValueError:  # an integer of thousands of digits
            raise InvalidArgument(field, "holds a number too long to read; token ids are "
                                         "small integers.") from None
        except RecursionError:
            raise InvalidArgument(field, "is nested too deeply; send one flat object per "
                                         'line, {"text": "..."} or {"ids": [...]}.') from None
        if not isinstance(item, dict) or len(item.keys() & {"text", "ids"}) != 1:
            raise InvalidArgument(field, 'must be an object with exactly one of "text" and '
                                         '"ids".')
        if "text" in item:
            yield _tokenize(item["text"], field, limits, tokenizer)
        else:
            ids = item["ids"]
            if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidArgument(field, '"ids" must be a list of integers.')
            yield training_ids(ids, field, limits)
        count += 1
        if count > MAX_TRAINING_SEQUENCES:
            raise InvalidArgument("data", f"more than {MAX_TRAINING_SEQUENCES} examples.")


def _inline(sequences: Iterable[np.ndarray], field: str) -> Iterator[np.ndarray]:
    """`sequences`, refused once they pass MAX_INLINE_TOKENS in all."""
    tokens = 0
    for sequence in sequences:
        tokens += sequence.size
        if tokens > MAX_INLINE_TOKENS:
            raise InvalidArgument(field, f"hold more than {MAX_INLINE_TOKENS} tokens, the most "
                                         f"accepted inline; {_UPLOAD_HINT}")
        yield sequence


def check_training_length(num_sequences: int, config: FineTuneConfig) -> None:
    """Refuses a job of more than MAX_STEPS steps (epochs x batches per epoch),
    a length no client means and progress counters cannot hold.

    Raises:
        InvalidArgument: naming epochs, the field to lower.
    """
    steps = total_steps(num_sequences, config)
    if steps > MAX_STEPS:
        raise InvalidArgument("epochs", f"{config.epochs} epochs of {num_sequences} sequences "
                                        f"in batches of {config.batch_size} make {steps} "
                                        f"steps; at most {MAX_STEPS} are allowed. Use fewer "
                                        "epochs, or set steps instead.")


def cheap_to_parse(message: ft_pb.StartFineTuneRequest, limits: ServiceLimits) -> bool:
    """Whether `parse_fine_tune_request(message)` is quick enough for the
    event loop, by Forward's measure (forward_request.cheap_to_parse): a
    dataset_id, a Forward's worth of short items (LOOP_TOKENIZE_CHARS
    characters or ids in all), or more items than are accepted inline
    (refused before any is read)."""
    count = len(message.texts) + len(message.sequences)
    if count > MAX_INLINE_SEQUENCES:
        return True
    if count > limits.max_sequences_per_request:
        return False
    return (sum(len(text) for text in message.texts)
            + sum(len(sequence.ids) for sequence in message.sequences)) <= LOOP_TOKENIZE_CHARS


def parse_fine_tune_request(message: ft_pb.StartFineTuneRequest, limits: ServiceLimits,
                            tokenizer: GemmaTokenizer | None, max_rank: int,
                            max_batch_tokens: int) -> FineTuneRequest:
    """Validates `message`.

    Raises:
        InvalidArgument: naming the field at fault.
    """
    name = check_name("adapter_name", message.adapter_name)
    sources = [bool(message.texts), bool(message.sequences), bool(message.dataset_id)]
    if sum(sources) != 1:
        raise InvalidArgument("texts, sequences, dataset_id",
                              "send the training data one way: texts, token sequences, or "
                              "the id of an uploaded dataset.")
    count = len(message.texts) + len(message.sequences)
    if count > MAX_INLINE_SEQUENCES:
        raise InvalidArgument("texts" if message.texts else "sequences",
                              f"{count} items; at most {MAX_INLINE_SEQUENCES} are accepted "
                              f"inline; {_UPLOAD_HINT}")
    rank = message.rank or DEFAULT_RANK
    if not 1 <= rank <= max_rank:
        raise InvalidArgument("rank", f"{rank} is outside 1..{max_rank} (this server's "
                                      "maximum adapter rank).")
    if message.steps and message.epochs:
        raise InvalidArgument("steps, epochs", "set one of them, not both.")
    if message.steps < 0 or message.epochs < 0 or message.steps > MAX_STEPS \
            or message.epochs > MAX_STEPS:
        raise InvalidArgument("steps, epochs", f"must be in 1..{MAX_STEPS} when set.")
    sequence_length = message.sequence_length or min(DEFAULT_SEQUENCE_LENGTH,
                                                     limits.max_sequence_length)
    if not 2 <= sequence_length <= limits.max_sequence_length:
        raise InvalidArgument("sequence_length", f"{sequence_length} is outside 2.."
                                                 f"{limits.max_sequence_length}.")
    batch_size = message.batch_size or 8
    if batch_size < 1 or batch_size * sequence_length > max_batch_tokens:
        raise InvalidArgument("batch_size", f"{batch_size} rows of {sequence_length} tokens; "
                                            f"batch_size x sequence_length must be in 1.."
                                            f"{max_batch_tokens}.")
    for field in ("alpha", "learning_rate"):
        value = getattr(message, field)
        if not np.isfinite(value) or value < 0:
            raise InvalidArgument(field, f"{value} must be a positive number (0: default).")
    if message.seed < 0:
        raise InvalidArgument("seed", f"{message.seed} is negative; seeds are integers >= 0.")
    if message.learning_rate > 1:
        raise InvalidArgument("learning_rate", f"{message.learning_rate} is above 1; LoRA "
                                               "learning rates are around 1e-4 to 1e-2.")
    if len(message.targets) > len(lora_targets.TARGETS):
        raise InvalidArgument("targets", f"{len(message.targets)} names; there are "
                                         f"{len(lora_targets.TARGETS)} projections.")
    try:
        targets = FineTuneConfig(rank=1, steps=1, targets=tuple(message.targets)).targets \
            if message.targets else DEFAULT_TARGETS
    except ValueError as error:
        raise InvalidArgument("targets", str(error).removeprefix(
            "FineTuneConfig.targets: ")) from None
    config = FineTuneConfig(
        rank=rank, alpha=message.alpha or None, learning_rate=message.learning_rate or 1e-3,
        steps=message.steps or None,
        epochs=message.epochs or (None if message.steps else 1),
        batch_size=batch_size, sequence_length=sequence_length, seed=int(message.seed),
        targets=targets)
    sequences = None
    if message.texts:
        sequences = PackedSequences.pack(_inline(
            (_tokenize(text, f"texts[{i}]", limits, tokenizer)
             for i, text in enumerate(message.texts)), "texts"))
    elif message.sequences:
        sequences = PackedSequences.pack(_inline(
            (training_ids(s.ids, f"sequences[{i}]", limits)
             for i, s in enumerate(message.sequences)), "sequences"))
    if sequences is not None:
        check_training_length(len(sequences), config)
    return FineTuneRequest(adapter_name=name, config=config, sequences=sequences,
                           dataset_id=message.dataset_id,
                           initial_adapter_id=message.initial_adapter_id)
