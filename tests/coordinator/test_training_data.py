"""Training data on the coordinator: packed sequences, the inline caps of
StartFineTune (checked before any item is read), datasets parsed from a
file a line at a time."""

import time

import numpy as np
import pytest

from coordinator.errors import InvalidArgument
from coordinator.fine_tune_request import (MAX_INLINE_SEQUENCES, MAX_INLINE_TOKENS,
                                           cheap_to_parse, max_line_bytes, parse_dataset_file,
                                           parse_fine_tune_request)
from coordinator.forward_request import LOOP_TOKENIZE_CHARS
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.service_config import ServiceLimits
from gemma_core import GemmaTokenizer
from worker.packed_sequences import PackedSequences

LIMITS = ServiceLimits(vocabulary_size=1024, num_layers=4, hidden_dim=128,
                       max_sequence_length=1024, max_text_bytes=16384)


@pytest.fixture(scope="module")
def tokenizer():
    return GemmaTokenizer.from_preset("default")


def parse(tokenizer, **fields):
    return parse_fine_tune_request(fpb.StartFineTuneRequest(adapter_name="x", **fields),
                                   LIMITS, tokenizer, max_rank=8, max_batch_tokens=16384)


def test_packed_sequences_index_like_a_tuple():
    arrays = [np.arange(n % 7 + 2, dtype="int32") for n in range(10_000)]
    packed = PackedSequences.pack(iter(arrays))
    assert len(packed) == 10_000 and packed.num_tokens == sum(a.size for a in arrays)
    for index in (0, 4095, 4096, 9_999, -1):
        np.testing.assert_array_equal(packed[index], arrays[index])
    with pytest.raises(IndexError):
        packed[10_000]
    assert [a.tolist() for a in PackedSequences.pack([[1, 2], [3, 4, 5]])] == [[1, 2],
                                                                              [3, 4, 5]]
    assert len(PackedSequences.pack([])) == 0
    with pytest.raises(ValueError, match="offsets"):
        PackedSequences(np.arange(4), np.array([0, 3, 2, 4]))


@pytest.mark.parametrize("field", ["texts", "sequences"])
def test_more_inline_items_than_the_cap_are_refused_before_any_is_read(tokenizer, field):
    items = (["a b"] if field == "texts" else [fpb.TrainingSequence(ids=[5, 6])])
    message = fpb.StartFineTuneRequest(adapter_name="x",
                                       **{field: items * (MAX_INLINE_SEQUENCES + 1)})
    started = time.perf_counter()
    with pytest.raises(InvalidArgument) as caught:
        parse_fine_tune_request(message, LIMITS, tokenizer, 8, 16384)
    assert time.perf_counter() - started < 0.05  # no per-item work
    assert caught.value.field == field
    assert f"{MAX_INLINE_SEQUENCES + 1} items; at most {MAX_INLINE_SEQUENCES}" in str(
        caught.value) and "UploadDataset" in str(caught.value)


def test_inline_tokens_are_capped(tokenizer):
    per = MAX_INLINE_TOKENS // MAX_INLINE_SEQUENCES
    at_cap = parse(tokenizer, sequences=[fpb.TrainingSequence(ids=[5] * per)]
                   * MAX_INLINE_SEQUENCES, steps=1)
    assert len(at_cap.sequences) == MAX_INLINE_SEQUENCES
    assert at_cap.sequences.num_tokens == MAX_INLINE_TOKENS
    with pytest.raises(InvalidArgument, match=f"more than {MAX_INLINE_TOKENS} tokens"):
        parse(tokenizer, sequences=[fpb.TrainingSequence(ids=[5] * (per + 1))]
              * MAX_INLINE_SEQUENCES, steps=1)


def test_a_text_over_the_byte_limit_is_refused(tokenizer):
    with pytest.raises(InvalidArgument, match=r"texts\[1\]: is 16385 bytes; the limit is "
                                              "16384"):
        parse(tokenizer, texts=["a b", "x" * 16385])


def test_datasets_parse_from_a_file_a_line_at_a_time(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes("\ufeff{\"ids\": [3, 4, 5]}\r\n\n{\"text\": \"one\u2028two\"}\n".encode())
    packed = parse_dataset_file(path, LIMITS, tokenizer)
    assert len(packed) == 2 and packed[0].tolist() == [3, 4, 5]
    longest = max_line_bytes(LIMITS)
    path.write_bytes(b'{"ids": [3, 4]}\n' + b" " * longest + b'{"ids": [1, 2]}\n')
    with pytest.raises(InvalidArgument, match=f"data line 2: is longer than {longest} bytes"):
        parse_dataset_file(path, LIMITS, tokenizer)
    path.write_bytes(b'{"ids": [3, 4]}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidArgument, match="data line 2: is not UTF-8"):
        parse_dataset_file(path, LIMITS, tokenizer)
    path.write_bytes(b"\n \n")
    with pytest.raises(InvalidArgument, match="holds no examples"):
        parse_dataset_file(path, LIMITS, tokenizer)


def test_what_is_cheap_enough_to_parse_on_the_event_loop(tokenizer):
    """A dataset_id, or a Forward's worth of short items: parsed on the loop,
    queued behind no other tenant; more goes to the training-data lane."""
    def request(**fields):
        return fpb.StartFineTuneRequest(adapter_name="x", steps=1, **fields)
    assert cheap_to_parse(request(dataset_id="data"), LIMITS)
    short = [fpb.TrainingSequence(ids=[5] * 256)] * LIMITS.max_sequences_per_request
    assert cheap_to_parse(request(sequences=short), LIMITS)
    assert not cheap_to_parse(request(sequences=short + short[:1]), LIMITS)
    assert not cheap_to_parse(request(sequences=[fpb.TrainingSequence(
        ids=[5] * (LOOP_TOKENIZE_CHARS + 1))]), LIMITS)
    assert cheap_to_parse(request(texts=["a b c"] * 64), LIMITS)
    assert not cheap_to_parse(request(texts=["a" * (LOOP_TOKENIZE_CHARS + 1)]), LIMITS)
    # Refused before any item is read: cheap however many.
    assert cheap_to_parse(request(texts=["a"] * (MAX_INLINE_SEQUENCES + 1)), LIMITS)
    started = time.perf_counter()
    parse(tokenizer, sequences=short, steps=1)
    parse(tokenizer, texts=["some words to tokenize " * 10] * 64, steps=1)
    assert time.perf_counter() - started < 0.05  # a few ms on the loop
