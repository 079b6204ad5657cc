"""Fine-tune requests and training data: proto in, validated plain data out.

The one place StartFineTuneRequest messages and uploaded datasets are read;
every rule names the field (or line) to fix.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from coordinator.adapter_record import check_name, shown
from coordinator.errors import InvalidArgument
from coordinator.generated.gemma.v1 import finetune_service_pb2 as ft_pb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer
from gemma_core.fine_tune_config import FineTuneConfig
from gemma_core.lora_trainer import total_steps

DEFAULT_RANK = 8
DEFAULT_SEQUENCE_LENGTH = 128
MAX_STEPS = 1_000_000
MAX_TRAINING_SEQUENCES = 1_000_000


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
    sequences: tuple[np.ndarray, ...] | None
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
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate from a JSON "\ud800" escape
        raise InvalidArgument(field, f"holds {text[error.start]!r} at character {error.start}, "
                                     "half of a surrogate pair, which is not text; send "
                                     "valid Unicode.") from None
    return training_ids(tokenizer.tokenize(text, add_bos=True), f"{field} (tokenized)", limits)


def parse_dataset_lines(data: bytes, limits: ServiceLimits,
                        tokenizer: GemmaTokenizer | None) -> list[np.ndarray]:
    """JSON Lines, one {"text": "..."} or {"ids": [...]} per line, to token ids.

    Lines end at "\\n" only (as JSON Lines says), so a text may hold any other
    line separator; a UTF-8 byte order mark at the start is skipped.
    """
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise InvalidArgument("data", f"is not UTF-8 JSON Lines ({error}).") from None
    sequences = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        field = f"data line {number}"
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
            sequences.append(_tokenize(item["text"], field, limits, tokenizer))
        else:
            ids = item["ids"]
            if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidArgument(field, '"ids" must be a list of integers.')
            sequences.append(training_ids(ids, field, limits))
        if len(sequences) > MAX_TRAINING_SEQUENCES:
            raise InvalidArgument("data", f"more than {MAX_TRAINING_SEQUENCES} examples.")
    if not sequences:
        raise InvalidArgument("data", "holds no examples; send one JSON object per line.")
    return sequences


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
    config = FineTuneConfig(
        rank=rank, alpha=message.alpha or None, learning_rate=message.learning_rate or 1e-3,
        steps=message.steps or None,
        epochs=message.epochs or (None if message.steps else 1),
        batch_size=batch_size, sequence_length=sequence_length, seed=int(message.seed))
    sequences = None
    if message.texts:
        sequences = tuple(_tokenize(text, f"texts[{i}]", limits, tokenizer)
                          for i, text in enumerate(message.texts))
    elif message.sequences:
        sequences = tuple(training_ids(s.ids, f"sequences[{i}]", limits)
                          for i, s in enumerate(message.sequences))
    if sequences is not None:
        check_training_length(len(sequences), config)
    return FineTuneRequest(adapter_name=name, config=config, sequences=sequences,
                           dataset_id=message.dataset_id,
                           initial_adapter_id=message.initial_adapter_id)
