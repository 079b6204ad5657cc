"""Batch formation on its own: which rows a batch takes, when it is trimmed
to a cheaper bucket, how long it waits for more rows, and how it is padded."""

import dataclasses
import math

import numpy as np
import pytest

from coordinator.batch_policy import (CALLERS_RETURN_WITHIN_S, MAX_STRAGGLER_WAIT_S,
                                      BatchPolicy)
from coordinator.batch_timings import BatchTimings
from scheduler_support import CONFIG, make_work
from worker.batch import BatchResult, BatchRow


@dataclasses.dataclass(eq=False)
class Row:
    work: object
    token_ids: np.ndarray
    slot: int = 0
    queued_at: float = math.inf   # arrived now, unless a test says
    score: object = None

    @property
    def tokens(self):
        return len(self.token_ids)


def row(tokens, layers=(0,), slot=0, pooling="none", dtype="float32"):
    work = make_work([tokens], layers, pooling=pooling, dtype=dtype)
    return Row(work, work.sequences[0], slot)


def seeded(cost, config=CONFIG, length=4, adapters=False):
    policy = BatchPolicy(config)
    for rows in config.batch_buckets:
        for _ in range(2):                     # the first run of a shape is its compilation
            policy.timings.record((rows, length, adapters, False), cost(rows))
    return policy


# ---- take ------------------------------------------------------------------------------------


def test_take_keeps_the_order_given_and_skips_rows_that_break_the_budget_or_layer_slots():
    policy = BatchPolicy(CONFIG)
    rows = [row([1] * 16), row([2], (1,)), row([3], (2,)), row([4] * 16), row([5])]
    # [1]*16 and [2]: 2 x 16 = 32 tokens; [3] would make 3 layers; [4]*16 and [5]
    # would make 3 rows (a bucket of 4 x 16 = 64 tokens).
    assert policy.take(rows) == rows[:2]
    short = [row([k]) for k in range(1, 7)]
    assert policy.take(short) == short[:4]     # the largest bucket
    assert policy.take([]) == []


def test_take_trims_to_a_full_smaller_bucket_only_where_timed_cheaper_per_row():
    rows = [row([k]) for k in (1, 2, 3)]
    assert seeded(lambda b: 0.15 * b).take(rows) == rows[:2]     # 0.3/2 < 0.6/3
    assert seeded(lambda b: 0.5).take(rows) == rows               # 0.5/2 > 0.5/3
    assert BatchPolicy(CONFIG).take(rows) == rows                 # nothing timed: whole
    # Timings of base-model batches do not decide for adapter rows.
    with_adapter = [row([k], slot=1) for k in (1, 2, 3)]
    assert seeded(lambda b: 0.15 * b).take(with_adapter) == with_adapter
    assert seeded(lambda b: 0.15 * b, adapters=True).take(with_adapter) == with_adapter[:2]
    # A full bucket is never trimmed.
    four = [row([k]) for k in (1, 2, 3, 4)]
    assert seeded(lambda b: 0.15 * b).take(four) == four


def test_a_stale_timing_of_the_whole_bucket_runs_it_whole_again():
    now = [0.0]
    policy = BatchPolicy(CONFIG)
    policy.timings = BatchTimings(clock=lambda: now[0])
    for rows in CONFIG.batch_buckets:
        for _ in range(2):
            policy.timings.record((rows, 4, False, False), 0.15 * rows)
    rows = [row([k]) for k in (1, 2, 3)]
    assert policy.take(rows) == rows[:2]
    now[0] = 31.0
    assert policy.take(rows) == rows


# ---- wait_left -------------------------------------------------------------------------------


def test_a_full_batch_or_nothing_ready_never_waits():
    policy = seeded(lambda b: 0.5, dataclasses.replace(CONFIG, max_wait_ms=50.0))
    policy.ran(policy.pack([row([7])] * 4), BatchResult([], 0.5), 0.5, ended=0.0, alone=True)
    assert policy.wait_left([], None, 0, 0.0, 0.0) == 0.0
    assert policy.wait_left([row([1])] * 4, None, 0, 0.0, 0.0) == 0.0
    assert policy.wait_left([row([1] * 16)] * 2, None, 0, 0.0, 0.0) == 0.0   # the budget's full
    assert policy.wait_left([row([1])] * 2, None, 0, 0.0, 0.0) > 0.0


def test_while_the_device_is_busy_the_next_batch_is_sent_to_arrive_as_it_frees():
    policy = BatchPolicy(CONFIG)
    ready = [row([1])]
    assert policy.wait_left(ready, None, 1, 10.0, 10.0) == 0.0           # end unknown: now
    assert policy.wait_left(ready, 10.3, 1, 10.0, 10.0) == pytest.approx(0.3)
    # Less the time a batch spends on its way (the median of recent calls).
    for call_s in (0.05, 0.1, 0.5):
        policy.ran(policy.pack(ready), BatchResult([], 0.0), call_s, 10.0, alone=True)
    assert policy.overhead_s() == pytest.approx(0.1)
    assert policy.wait_left(ready, 10.3, 1, 10.0, 10.0) == pytest.approx(0.2)


def test_a_batchs_wait_behind_the_one_sent_before_it_is_not_counted_as_round_trip():
    """With two batches out, the second's call includes the first's time on
    the device; counted as round trip, that would make every next batch go
    at once, in batches of one (seen at 4 clients before this was fixed)."""
    policy = BatchPolicy(CONFIG)
    ready = [row([1])]
    policy.ran(policy.pack(ready), BatchResult([], 0.08), 0.085, 1.0, alone=True)
    for _ in range(3):  # each sent behind another: 0.075 s of its call was that one's
        policy.ran(policy.pack(ready), BatchResult([], 0.08), 0.16, 1.0, alone=False)
    assert policy.overhead_s() == pytest.approx(0.005)


@pytest.mark.parametrize("cost, ready, expected", [
    (lambda b: 0.15 * b, 2, 0.0),     # 2 now + 2 later cost what 4 do: no wait
    (lambda b: 0.15 * b, 3, 0.12),    # 3 pad to 4 anyway: up to a fifth of the last batch
    (lambda b: 0.5, 2, 0.1)],         # a second batch costs a whole one: a fifth of 0.5
    ids=["linear 2 of 4", "linear 3 of 4", "flat 2 of 4"])
def test_stragglers_are_waited_for_only_as_long_as_it_can_pay(cost, ready, expected):
    policy = seeded(cost)
    batch = policy.pack([row([7])] * 4)
    policy.ran(batch, BatchResult([], cost(4)), cost(4), ended=100.0, alone=True)
    rows = [row([1])] * ready
    assert policy.wait_left(rows, 100.0, 0, 100.0, 100.0) == pytest.approx(expected)
    # Time already waited counts.
    assert policy.wait_left(rows, 100.0, 0, 100.0, 100.05) == pytest.approx(
        max(expected - 0.05, -0.05))


def test_nobody_is_waited_for_after_an_idle_spell_or_once_as_many_rows_are_back():
    policy = seeded(lambda b: 0.5)
    policy.ran(policy.pack([row([7])] * 4), BatchResult([], 0.5), 0.5, ended=100.0, alone=True)
    two = [row([1])] * 2
    assert policy.wait_left(two, 100.0, 0, 100.0, 100.0) > 0.0
    late = 100.0 + CALLERS_RETURN_WITHIN_S + 0.01
    assert policy.wait_left(two, 100.0, 0, late, late) == 0.0
    four = [row([1])] * 4                           # as many as were answered: all back
    assert policy.wait_left(four[:3] + [row([2])], 100.0, 0, 100.0, 100.0) == 0.0


def test_the_callers_expected_back_are_those_of_every_batch_answered_lately():
    """Two batches in flight, 15 rows and then 1, answered a moment apart:
    16 callers are on their way, not the last batch's one (which split
    every batch in two at real size, 6.4 rows a batch at 16 clients)."""
    policy = seeded(lambda b: {1: 1.3, 2: 2.0, 4: 3.0}[b])
    policy.ran(policy.pack([row([7])] * 3), BatchResult([], 10.0), 10.0, ended=100.0,
               alone=True)
    policy.ran(policy.pack([row([7])]), BatchResult([], 1.3), 1.3, ended=101.3, alone=False)
    three = [row([1])] * 3
    assert policy.wait_left(three, None, 0, 101.3, 101.3) > 0.0      # the fourth is coming
    assert policy.wait_left(three + [row([2])], None, 0, 101.3, 101.3) == 0.0


def test_after_a_long_batch_its_callers_are_waited_for_longer():
    """Answering the callers of a 10 s batch (real size on a CPU) and their
    next calls take the service longer than 0.2 s; they are still on the
    way, and a lone row sent without them costs the device a whole extra
    batch (seen: 6.4 rows a batch instead of 16 at 16 clients)."""
    policy = seeded(lambda b: {1: 1.3, 2: 2.0, 4: 3.0}[b])
    policy.ran(policy.pack([row([7])] * 4), BatchResult([], 10.0), 10.0, ended=100.0, alone=True)
    one = [row([1])]
    wait = policy.wait_left(one, None, 0, 100.5, 100.5)   # half a second after its end
    assert wait > 0.5
    assert policy.wait_left(one, None, 0, 103.0, 103.0) == 0.0   # long after: nobody


def test_the_straggler_wait_is_a_fifth_of_the_last_batch_capped_and_floored_by_max_wait():
    policy = BatchPolicy(dataclasses.replace(CONFIG, max_wait_ms=5.0))
    policy.last_batch_seconds = 0.1
    assert policy.straggler_wait_s() == pytest.approx(0.02)
    policy.last_batch_seconds = 4.0                 # a real-size batch on a CPU: 0.8 s
    assert policy.straggler_wait_s() == pytest.approx(0.8)
    policy.last_batch_seconds = 100.0
    assert policy.straggler_wait_s() == MAX_STRAGGLER_WAIT_S
    policy.last_batch_seconds = 0.001
    assert policy.straggler_wait_s() == pytest.approx(0.005)


# ---- pack ----------------------------------------------------------------------------------


def test_pack_pads_to_the_buckets_and_records_each_rows_slot_and_layers():
    policy = BatchPolicy(CONFIG)
    rows = [row([5, 6, 7], (3,), slot=2, pooling="mean"),
            row([8] * 6, (1, 3), dtype="bfloat16")]
    batch = policy.pack(rows)
    assert batch.shape == (2, 8)
    assert batch.token_ids.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8] * 6 + [0, 0]]
    assert batch.padding_mask.tolist() == [[1] * 3 + [0] * 5, [1] * 6 + [0] * 2]
    assert batch.slot_ids.tolist() == [2, 0]
    assert batch.layer_ids.tolist() == [1, 3]
    assert batch.rows == (BatchRow(3, (1,), "mean", "float32"),
                          BatchRow(6, (0, 1), "none", "bfloat16"))
    three = policy.pack([row([1], (2,))] * 3)
    assert three.shape == (4, 4) and three.layer_ids.tolist() == [2, 2]   # unused slot repeats
    assert not three.padding_mask[3].any() and three.slot_ids.tolist() == [0] * 4
    assert BatchPolicy.shape_key(batch) == (2, 8, True, False)
    assert BatchPolicy.shape_key(three) == (4, 4, False, False)


def test_estimate_is_the_timed_seconds_of_a_batchs_shape():
    policy = BatchPolicy(CONFIG)
    batch = policy.pack([row([1])] * 2)
    assert policy.estimate(batch) is None
    policy.ran(batch, BatchResult([], 9.0), 9.0, 0.0, alone=True)           # compiled
    policy.ran(batch, BatchResult([], 0.25), 0.3, 1.0, alone=True)
    assert policy.estimate(batch) == 0.25
    assert policy.last_batch_seconds == 0.25
    assert policy.estimate(policy.pack([row([1], slot=1)] * 2)) is None   # adapters apart


@pytest.mark.parametrize("cost, holds", [
    (lambda b: {1: 1.2, 2: 1.5, 4: 2.5}[b], True),   # real size on a CPU: a lone row is dear
    (lambda b: 0.3 * b, False)],                       # cost in proportion: nothing to save
    ids=["lone row dear", "linear"])
def test_a_few_rows_wait_for_the_callers_of_the_batch_in_flight_only_where_that_pays(
        cost, holds):
    """Two rows ready, two on the device: sending them now costs a batch of
    their own; holding them until the two come back costs the device only
    the round trip. The measured times decide which."""
    policy = seeded(cost)
    ready = [row([1])] * 2
    wait = policy.wait_left(ready, 10.5, 1, 10.0, 10.0, rows_in_flight=2)
    if holds:
        assert wait == math.inf                     # until the batch in flight is back
    else:
        assert wait == pytest.approx(0.5)           # sent to arrive as it ends
    # Rows that could not join them in one batch are never held for them.
    assert policy.wait_left(ready, 10.5, 1, 10.0, 10.0, rows_in_flight=3) == pytest.approx(0.5)


def test_one_clients_sequential_requests_never_wait_for_themselves():
    """Two batches of one answered within the window, their caller came
    back each time (and was sent): the next lone row is not held for a
    phantom second caller (that cost the mid model's short request 13 ms)."""
    policy = seeded(lambda b: {1: 0.05, 2: 0.06, 4: 0.08}[b])
    for ended in (100.0, 100.06):
        policy.arrived(ended - 0.06, 1)                  # the request, then its batch
        policy.ran(policy.pack([row([7])]), BatchResult([], 0.05), 0.05, ended=ended,
                   alone=True)
    policy.arrived(100.061, 1)                            # it came back once more
    assert policy.wait_left([row([1])], None, 0, 100.061, 100.061) == 0.0
    # Its row not yet back: then one is worth waiting for, briefly.
    policy.ran(policy.pack([row([7]), row([8])]), BatchResult([], 0.06), 0.06, ended=100.07,
               alone=True)
    assert policy.wait_left([row([1])], None, 0, 100.071, 100.071) > 0.0
