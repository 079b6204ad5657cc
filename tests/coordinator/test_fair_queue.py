"""The per-tenant queue serves tenants fair shares of tokens: the order it
would serve rows in, what serving charges, and that idle time is not
banked as credit."""

import dataclasses
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.fair_queue import FairQueue

_arrivals = itertools.count()


@dataclasses.dataclass(eq=False)
class Row:
    tenant: str
    tokens: int
    name: str = ""
    arrival: int = dataclasses.field(default_factory=lambda: next(_arrivals))


def push(queue, tenant, *tokens, prefix=None):
    rows = [Row(tenant, t, f"{prefix or tenant}{i}") for i, t in enumerate(tokens)]
    for row in rows:
        queue.push(row)
    return rows


def names(rows):
    return [r.name for r in rows]


def test_in_fair_order_interleaves_tenants_by_tokens_served():
    queue = FairQueue()
    push(queue, "a", 10, 10, 10)
    push(queue, "b", 5, 5, 5)
    # a0 (older, both at 0); b0 and b1 while b is behind; level at 10: the older a1.
    assert names(queue.in_fair_order()) == ["a0", "b0", "b1", "a1", "b2", "a2"]
    assert len(queue) == 6 and queue.rows_of("a") == 3 and queue.rows_of("c") == 0
    assert names(queue) == ["a0", "a1", "a2", "b0", "b1", "b2"]     # iteration: by tenant
    # Looking is free: nothing was charged.
    assert names(queue.in_fair_order()) == ["a0", "b0", "b1", "a1", "b2", "a2"]


def test_serving_charges_the_tenant_and_dropping_does_not():
    queue = FairQueue()
    a = push(queue, "a", 8, 8)
    b = push(queue, "b", 8, 8)
    queue.remove(a[:1], served=True)                    # a: 8 tokens served
    assert names(queue.in_fair_order()) == ["b0", "a1", "b1"]
    queue.remove(b[:1], served=False)                   # b's first dropped: b still at 0
    assert names(queue.in_fair_order()) == ["b1", "a1"]
    assert len(queue) == 2 and queue.rows_of("b") == 1


def test_one_tenants_long_rows_do_not_hold_back_anothers_short_ones():
    queue = FairQueue()
    push(queue, "a", *[100] * 5)
    push(queue, "b", *[1] * 5)
    order = names(queue.in_fair_order())
    assert order[:6] == ["a0", "b0", "b1", "b2", "b3", "b4"]


def test_an_idle_tenant_rejoining_gets_no_banked_credit():
    queue = FairQueue()
    a = push(queue, "a", *[10] * 100)
    queue.remove(a[:100], served=True)                  # a alone: 1000 tokens served
    push(queue, "a", 10, 10, 10, prefix="a'")
    push(queue, "b", 10, 10, 10)                        # b new: level with a, not at 0
    assert names(queue.in_fair_order()) == ["a'0", "b0", "a'1", "b1", "a'2", "b2"]


def test_a_tenant_gone_idle_cannot_restart_below_what_it_was_served():
    queue = FairQueue()
    b = push(queue, "b", 500)
    push(queue, "a", 10)
    queue.remove(b, served=True)                        # b: 500 served, then idle
    push(queue, "a", *[10] * 5, prefix="a'")
    push(queue, "b", 10, prefix="b'")                   # back: still at 500, a at 0
    assert names(queue.in_fair_order()) == ["a0", "a'0", "a'1", "a'2", "a'3", "a'4", "b'0"]


def test_forgetting_tenants_far_behind_keeps_those_that_are_ahead():
    """Counts of tenants gone idle are pruned once they are behind every
    busy tenant (a pruned one restarts level with the busy ones, as it
    would anyway), but one served far more keeps its count."""
    queue = FairQueue()
    big = push(queue, "big", 10_000)
    queue.remove(big, served=True)                      # big: far ahead, idle
    a = push(queue, "a", *[100] * 20)                   # busy throughout
    for k in range(100):                                # tenants come and go at 1 token
        row = push(queue, f"t{k}", 1)
        queue.remove(row, served=True)
    queue.remove(a[:2], served=True)                    # a at 200: every t is behind it
    assert len(queue._served) < 10                      # their counts are not kept forever
    push(queue, "big", 100, prefix="big'")
    order = names(queue.in_fair_order())
    assert order[:18] == [f"a{i}" for i in range(2, 20)] and order[18] == "big'0"
    push(queue, "t0", 1, prefix="t0'")                  # level with a (200), not below
    assert names(queue.in_fair_order())[:3] == ["a2", "t0'0", "a3"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 50),
                          st.sampled_from(["push", "push", "serve", "drop"])),
                max_size=60))
def test_in_fair_order_yields_every_queued_row_once_each_tenant_in_its_order(ops):
    queue, queued = FairQueue(), []
    for tenant, tokens, op in ops:
        if op == "push":
            row = Row(tenant, tokens)
            queue.push(row)
            queued.append(row)
        elif queued:
            order = list(queue.in_fair_order())
            gone = order[: 1 + tokens % 3]
            queue.remove(gone, served=op == "serve")
            queued = [r for r in queued if r not in gone]
        order = list(queue.in_fair_order())
        assert sorted(map(id, order)) == sorted(map(id, queued)) and len(queue) == len(queued)
        for t in "abcd":
            assert [r for r in order if r.tenant == t] == [r for r in queued if r.tenant == t]
            assert queue.rows_of(t) == sum(r.tenant == t for r in queued)


def test_a_newcomer_while_the_queue_is_empty_starts_at_the_clock_not_at_zero():
    """The queue often empties between batches: a tenant arriving then must
    not start at 0 against a tenant served for a long time (which would then
    wait until the newcomer had caught up)."""
    queue = FairQueue()
    old = push(queue, "a", *[100] * 10)
    queue.remove(old, served=True)              # a: 1000 tokens served; queue empty
    assert len(queue) == 0
    push(queue, "b", *[100] * 5)                # b arrives first, into the empty queue
    push(queue, "a", 100, 100, prefix="a_again")
    order = names(queue.in_fair_order())
    # b starts level with the last row served (900), a at 1000: a waits a row
    # or two, not all of b's (from 0, b would go first five times).
    assert order.index("a_again0") <= 2, order
