"""ModelQueue on a real event loop with the real cache and batch sizers.

Replicas are recorders (the RPC layer has its own end-to-end tests); query
arrival times are set by the test, so delayed batching and deadlines are
checked without sleeping.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clipper._native import cache as cache_mod
from clipper.errors import ContainerFailedError, DeadlineExceededError, ModelError
from clipper.errors import QueueFullError
from clipper.query.batching import ModelQueue

MS = 1_000_000


class App:
    """Records each item's outcome."""

    def __init__(self) -> None:
        self.outcomes: dict[int, tuple] = {}


class Item:
    """A queue item (the protocol of clipper.query.ticket.QueueItem) that records its outcome."""

    def __init__(self, app: App, qid: int, x, arrival_ns: int, deadline_ns: int) -> None:
        self.app = app
        self.query_id = qid
        self.input = x
        self.nbytes = x.nbytes
        self.arrival_ns = arrival_ns
        self.deadline_ns = deadline_ns
        self.done = False
        self.attempts = 0
        self.token = None
        self.followers = None
        self.queue = None

    def on_output(self, out):
        self._done(("result", out))

    def on_error(self, exc):
        self._done(("error", exc))

    def on_expired(self):
        self._done(("expired", None))

    def settle_elsewhere(self):
        """What a ticket's settle does to its item: answered by another path (its deadline, say)."""
        self._done(("settled", None))
        if self.queue is not None:
            self.queue.forget(self)

    def _done(self, outcome):
        assert not self.done, f"query {self.query_id} answered twice"
        self.done = True
        self.app.outcomes[self.query_id] = outcome


class Replica:
    def __init__(self, rid: int) -> None:
        self.replica_id = rid
        self.pid = 1000 + rid
        self.dead = False
        self.batch = None
        self.batch2 = None
        self.sizer = None


class Harness:
    def __init__(self, *, cache: bool = True, **kw) -> None:
        self.loop = asyncio.new_event_loop()
        self.sent: list = []
        self._waiter = None
        self.cache = cache_mod.PredictionCache(1 << 20) if cache else None
        kw.setdefault("max_batch", 8)
        kw.setdefault("batching", "fixed")
        self.queue = ModelQueue("m:1", self.loop, self._send, deployment_id=1, max_queue_length=100,
                                max_batch_retries=1, cache=self.cache, **kw)
        self.app = App()
        self._next = 1

    def _send(self, replica, batch):
        self.sent.append(batch)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(batch)

    def query(self, x, *, age_ms: float = 0.0, slo_ms: float = 10_000.0, lead: bool = True) -> Item:
        now = time.monotonic_ns() - int(age_ms * MS)
        q = Item(self.app, self._next, np.asarray(x, np.float32), now, now + int(slo_ms * MS))
        self._next += 1
        if self.cache is not None and lead:
            status, found = self.cache.lookup(1, q.input, q)
            if status == cache_mod.PENDING:
                found.followers = (found.followers or []) + [q]
                return q
            assert status == cache_mod.MISS
            q.token = found
        self.queue.submit(q)
        return q

    def next_batch(self, timeout: float = 5.0):
        """Run the loop until the queue sends a batch."""
        self._waiter = self.loop.create_future()
        return self.loop.run_until_complete(asyncio.wait_for(self._waiter, timeout))

    def settle(self):
        """Run the callbacks already scheduled (one loop turn)."""
        self.loop.run_until_complete(asyncio.sleep(0))

    def close(self):
        self.queue.close()
        self.loop.close()


@pytest.fixture
def h():
    made = []

    def make(**kw):
        made.append(Harness(**kw))
        return made[-1]

    yield make
    for x in made:
        x.close()


def test_free_replica_takes_up_to_its_batch_size(h):
    t = h(max_batch=3)
    r = Replica(1)
    t.queue.add_replica(r)
    qs = [t.query([i]) for i in range(5)]
    b = t.next_batch()
    assert b.queries == qs[:3] and r.batch is b
    t.queue.deliver(r, b, [10.0, 11.0, 12.0])
    b2 = t.next_batch()
    assert b2.queries == qs[3:]
    assert [t.app.outcomes[q.query_id] for q in qs[:3]] == [("result", 10.0), ("result", 11.0), ("result", 12.0)]


def test_answers_go_out_before_the_batch_bookkeeping_only_when_nothing_waits(h):
    # on_answered (the frontend's flush of queued replies) runs once a batch's outputs are all settled and
    # before the batch is taken off its replica, when no query waits; with queries waiting, the next batch
    # is sent first and the replies go out with the loop turn's others (on_answered is not called).
    seen = []
    t = h(max_batch=2)
    r = Replica(1)
    t.queue.on_answered = lambda: seen.append((r.batch, dict(t.app.outcomes)))
    t.queue.add_replica(r)
    qs = [t.query([i]) for i in range(3)]
    b1 = t.next_batch()
    t.queue.deliver(r, b1, [1.0, 2.0])  # qs[2] waits: no early flush
    assert seen == [] and t.app.outcomes[qs[1].query_id] == ("result", 2.0)
    b2 = t.next_batch()
    assert b2.queries == [qs[2]]
    t.queue.deliver(r, b2, [3.0])  # nothing waits: the flush comes first, with every answer settled
    assert len(seen) == 1
    batch_then, outcomes_then = seen[0]
    assert batch_then is b2  # the bookkeeping (the replica freed) came after it
    assert outcomes_then[qs[2].query_id] == ("result", 3.0)
    assert r.batch is None


def test_expired_queries_are_never_sent(h):
    t = h()
    r = Replica(1)
    qs = [t.query([0]), t.query([1], age_ms=50, slo_ms=10), t.query([2])]
    t.queue.add_replica(r)
    b = t.next_batch()
    assert b.queries == [qs[0], qs[2]]
    assert t.app.outcomes[qs[1].query_id] == ("expired", None)
    assert t.queue.queries_expired_in_queue == 1
    # its cache reservation was given back: the same input is a miss again
    assert t.cache.lookup(1, np.asarray([1], np.float32), None)[0] == cache_mod.MISS


def test_expired_leader_hands_its_reservation_to_a_live_follower(h):
    t = h()
    r = Replica(1)
    leader = t.query([7], age_ms=50, slo_ms=10)
    follower = t.query([7])  # same input: joins the leader's computation
    assert follower.token is None and leader.followers == [follower]
    t.queue.add_replica(r)
    b = t.next_batch()
    assert b.queries == [follower] and follower.token is not None
    assert t.app.outcomes[leader.query_id] == ("expired", None)
    t.queue.deliver(r, b, [70.0])
    assert t.app.outcomes[follower.query_id] == ("result", 70.0)
    status, out = t.cache.lookup(1, np.asarray([7], np.float32), None)
    assert (status, out) == (cache_mod.HIT, 70.0)


def test_outputs_reach_followers_and_fill_the_cache_even_when_late(h):
    t = h()
    r = Replica(1)
    t.queue.add_replica(r)
    leader = t.query([3])
    b = t.next_batch()
    follower = t.query([3])
    leader.settle_elsewhere()  # the leader's deadline passed while the batch was out
    t.queue.deliver(r, b, [np.arange(3.0)])
    kind, out = t.app.outcomes[follower.query_id]
    assert kind == "result" and out.tolist() == [0.0, 1.0, 2.0]
    status, cached = t.cache.lookup(1, np.asarray([3], np.float32), None)
    assert status == cache_mod.HIT and cached.tolist() == [0.0, 1.0, 2.0]


def test_cached_array_rows_do_not_pin_the_batch_buffer(h):
    t = h()
    r = Replica(1)
    t.queue.add_replica(r)
    q = t.query([4])
    b = t.next_batch()
    block = np.arange(20.0).reshape(1, 20)
    t.queue.deliver(r, b, list(block))
    _, cached = t.cache.lookup(1, np.asarray([4], np.float32), None)
    assert cached.base is None and cached.tolist() == block[0].tolist()
    assert t.app.outcomes[q.query_id][0] == "result"


def test_model_error_fails_followers_and_frees_the_entry(h):
    t = h()
    r = Replica(1)
    t.queue.add_replica(r)
    leader = t.query([5])
    b = t.next_batch()
    follower = t.query([5])
    t.queue.fail_batch(r, b, ModelError("boom"))
    assert t.app.outcomes[leader.query_id][0] == "error"
    assert t.app.outcomes[follower.query_id][0] == "error"
    assert t.cache.lookup(1, np.asarray([5], np.float32), None)[0] == cache_mod.MISS


def test_lost_container_requeues_then_fails_with_the_reason(h):
    t = h()
    r1, r2 = Replica(1), Replica(2)
    t.queue.add_replica(r1)
    q = t.query([6])
    b = t.next_batch()
    assert b.replica is r1
    r1.dead = True
    t.queue.remove_replica(r1, "exited (return code -9)")
    t.queue.add_replica(r2)
    b2 = t.next_batch()
    assert b2.queries == [q] and b2.replica is r2
    r2.dead = True
    t.queue.remove_replica(r2, "exited (return code -9)")  # second loss: no retries left
    kind, exc = t.app.outcomes[q.query_id]
    assert kind == "error" and isinstance(exc, ContainerFailedError) and "exited (return code -9)" in exc.message
    assert t.cache.lookup(1, np.asarray([6], np.float32), None)[0] == cache_mod.MISS


def test_fail_all_answers_every_queued_query_and_follower(h):
    t = h()
    a, b = t.query([1]), t.query([1])
    t.queue.fail_all(DeadlineExceededError("model removed"))
    assert t.app.outcomes[a.query_id][0] == "error" and t.app.outcomes[b.query_id][0] == "error"


# ------------------------------------------------------------------ two batches in flight
def test_one_batch_at_a_time_without_pipelining(h):
    t = h(max_batch=2)  # batches_in_flight = 1: the queue's own default
    r = Replica(1)
    t.queue.add_replica(r)
    qs = [t.query([i]) for i in range(6)]
    b = t.next_batch()
    t.settle()
    assert t.sent == [b] and r.batch is b and r.batch2 is None and t.queue.live == 4
    t.queue.deliver(r, b, [0.0, 1.0])
    assert t.next_batch().queries == qs[2:4]


def test_a_second_batch_goes_out_only_when_a_whole_batch_waits(h):
    t = h(max_batch=3, batches_in_flight=2)
    r = Replica(1)
    t.queue.add_replica(r)
    qs = [t.query([i]) for i in range(3)]
    b1 = t.next_batch()
    assert b1.queries == qs and r.batch is b1 and list(t.queue.half) == [r]
    qs += [t.query([3]), t.query([4])]
    t.settle()
    assert t.sent == [b1] and r.batch2 is None  # two queued: less than a batch, left to grow
    qs.append(t.query([5]))
    b2 = t.next_batch()
    assert b2.queries == qs[3:6] and r.batch is b1 and r.batch2 is b2 and not t.queue.half
    qs += [t.query([i]) for i in range(6, 10)]
    t.settle()
    assert t.sent == [b1, b2]  # two out: the replica takes no third
    before = time.monotonic_ns()
    t.queue.deliver(r, b1, [0.0, 1.0, 2.0])
    # the second batch now leads, its latency counted from this answer; a third may follow it
    assert r.batch is b2 and b2.sent_ns >= before
    b3 = t.next_batch()
    assert b3.queries == qs[6:9] and r.batch2 is b3
    t.queue.deliver(r, b2, [3.0, 4.0, 5.0])
    t.queue.deliver(r, b3, [6.0, 7.0, 8.0])
    b4 = t.next_batch()  # the replica is idle again: the last query goes out alone
    assert b4.queries == [qs[9]] and r.batch is b4 and r.batch2 is None
    assert [t.app.outcomes[q.query_id] for q in qs[:9]] == [("result", float(i)) for i in range(9)]


def test_a_second_batch_answered_first_is_served_and_the_replica_takes_another(h):
    t = h(max_batch=2, batches_in_flight=2)
    r = Replica(1)
    t.queue.add_replica(r)
    qs = [t.query([i]) for i in range(4)]
    t.next_batch()
    t.settle()
    b1, b2 = t.sent
    assert r.batch is b1 and r.batch2 is b2
    t.queue.deliver(r, b2, [2.0, 3.0])
    assert r.batch is b1 and r.batch2 is None and list(t.queue.half) == [r]
    qs += [t.query([4]), t.query([5])]
    b3 = t.next_batch()
    assert b3.queries == qs[4:6] and r.batch2 is b3
    t.queue.fail_batch(r, b1, ModelError("boom"))
    assert r.batch is b3 and r.batch2 is None
    assert [t.app.outcomes[q.query_id][0] for q in qs[:4]] == ["error", "error", "result", "result"]


def test_a_replica_lost_with_two_batches_out_has_both_retried_in_order(h):
    t = h(max_batch=2, batches_in_flight=2)
    r1, r2 = Replica(1), Replica(2)
    t.queue.add_replica(r1)
    qs = [t.query([i]) for i in range(5)]
    t.next_batch()
    t.settle()
    assert len(t.sent) == 2 and r1.batch2 is t.sent[1]
    r1.dead = True
    t.queue.remove_replica(r1, "exited (return code -9)")
    assert r1.batch is None and r1.batch2 is None and r1 not in t.queue.half
    assert [q for q in t.queue.pending if q.queue is t.queue] == qs  # back at the head, in their order
    t.queue.add_replica(r2)
    t.next_batch()
    t.settle()
    a, b = t.sent[2:]
    assert (a.queries, b.queries, r2.batch, r2.batch2) == (qs[:2], qs[2:4], a, b)
    got = []
    for batch in (a, b):
        got += batch.queries
        t.queue.deliver(r2, batch, [float(q.input[0]) for q in batch.queries])
    c = t.next_batch()
    got += c.queries
    t.queue.deliver(r2, c, [4.0])
    assert got == qs
    assert [t.app.outcomes[q.query_id] for q in qs] == [("result", float(i)) for i in range(5)]


def test_a_second_batch_answered_in_the_same_go_as_the_first_counts_half_its_time_out(h):
    t = h(max_batch=2, batches_in_flight=2)
    r = Replica(1)
    t.queue.add_replica(r)
    [t.query([i]) for i in range(6)]
    t.next_batch()
    t.settle()
    b1, b2 = t.sent
    for b in (b1, b2):
        b.sent_ns -= 10 * MS  # both out for 10 ms
        b.out_ns -= 10 * MS
    t.queue.deliver(r, b1, [0.0, 1.0])
    learned = r.lat_ewma_ns
    assert learned >= 10 * MS
    t.queue.deliver(r, b2, [2.0, 3.0])  # read right after the first: a gap of microseconds ...
    assert t.queue.last_batch_latency_ns >= 5 * MS  # ... counted as half its 10 ms out, not as that gap
    assert r.lat_ewma_ns >= learned + 0.2 * (5 * MS - learned) - MS
    b3 = t.next_batch()  # alone this time, then one sent behind it that runs for real after its answer
    [t.query([i]) for i in range(6, 8)]
    t.settle()
    b4 = t.sent[-1]
    assert r.batch is b3 and r.batch2 is b4
    t.queue.deliver(r, b3, [4.0, 5.0])
    b4.sent_ns -= 8 * MS  # its container took 8 ms after answering b3
    t.queue.deliver(r, b4, [6.0, 7.0])
    assert 8 * MS <= t.queue.last_batch_latency_ns < 9 * MS


def test_a_batch_lost_with_its_replica_wakes_a_replica_that_can_take_a_second_batch(h):
    t = h(max_batch=2, batches_in_flight=2)
    r1, r2 = Replica(1), Replica(2)
    t.queue.add_replica(r1)
    t.queue.add_replica(r2)
    [t.query([i]) for i in range(2)]
    t.next_batch()
    [t.query([i]) for i in range(2, 4)]
    t.settle()
    a, b = t.sent
    assert {a.replica, b.replica} == {r1, r2} and not t.queue.free and len(t.queue.half) == 2
    lost = a.replica
    lost.dead = True
    t.queue.remove_replica(lost, "exited")  # its two queries come back: the other replica takes them now
    c = t.next_batch()
    assert c.replica is b.replica and c.queries == a.queries and b.replica.batch2 is c


def test_the_estimate_counts_the_batch_behind_a_busy_replicas_first(h):
    t = h(max_batch=2, batches_in_flight=2)
    r = Replica(1)
    t.queue.add_replica(r)
    [t.query([i]) for i in range(4)]
    t.next_batch()
    t.settle()
    b1, _ = t.sent
    r.lat_ewma_ns = 2.0 * MS
    t.queue.replicas_changed()
    # nothing queued; one replica busy with two batches: the soonest it is free is after both
    now = b1.sent_ns
    assert t.queue.estimate_ns(now) == pytest.approx(2 * MS + 4 * MS)


# ------------------------------------------------------------------ delayed batching
def test_delay_holds_a_short_batch_while_queries_arrive_fast(h):
    t = h(max_batch=8, batch_delay_ms=10_000)
    r = Replica(1)
    t.queue.add_replica(r)
    t.query([0], age_ms=3)
    t.query([1], age_ms=2)
    t.query([2], age_ms=1)  # gaps of 1 ms, far under the delay
    t.settle()
    assert t.sent == [] and t.queue._delay_timer is not None
    # filling the batch sends it at once, without waiting for the timer
    for i in range(5):
        t.query([10 + i])
    b = t.next_batch()
    assert len(b.queries) == 8 and t.queue.delayed_batches == 0


def test_delay_timer_sends_what_arrived(h):
    t = h(max_batch=8, batch_delay_ms=30)
    r = Replica(1)
    t.queue.add_replica(r)
    t.query([0], age_ms=2)
    t.query([1], age_ms=1)
    b = t.next_batch()  # sent by the timer, about 30 ms after the oldest arrival
    assert len(b.queries) == 2 and t.queue.delayed_batches == 1


def test_delay_is_skipped_at_low_load(h):
    t = h(max_batch=8, batch_delay_ms=10_000)
    r = Replica(1)
    t.queue.add_replica(r)
    t.query([0], age_ms=60_000, slo_ms=120_000)
    t.query([1], age_ms=30_000, slo_ms=120_000)  # one query per 30 s: waiting would gather nothing
    b = t.next_batch()
    assert len(b.queries) == 2 and t.queue.delayed_batches == 0


def test_delay_is_skipped_once_the_oldest_query_waited_long_enough(h):
    t = h(max_batch=8, batch_delay_ms=5)
    r = Replica(1)
    t.query([0], age_ms=21)
    t.query([1], age_ms=20)
    t.queue.add_replica(r)  # the oldest query has waited 21 ms > 5 ms: send now
    b = t.next_batch()
    assert len(b.queries) == 2 and t.queue.delayed_batches == 0


def _round(t, r, n_more: int, base: int):
    """One round of a client: a query, ``n_more`` more while it may be held, then its batch sent and
    answered. Returns the batch."""
    before = len(t.sent)
    t.query([base])
    t.settle()  # the queue looks: a hold begins here, or the batch leaves at once
    for i in range(n_more):
        t.query([base + 1 + i])
    b = t.sent[before] if len(t.sent) > before else t.next_batch()
    t.queue.deliver(r, b, [0.0] * len(b.queries))
    while t.queue.live:  # (the rest, when the first batch left without them)
        b2 = t.next_batch()
        t.queue.deliver(r, b2, [0.0] * len(b2.queries))
    return b


def test_a_closed_loop_client_is_not_held_once_holds_are_seen_to_gather_nothing(h):
    """One query in flight at a time: a hold waits for arrivals that cannot come (the client waits for
    this very answer). After a few holds that gained nothing the queue stops holding, though the arrival
    rate alone (gaps far under the delay) would hold every query. (Mutations: without the gain check in
    ``_should_wait`` every one of the 8 rounds is held; a gain measured as the batch's size instead of
    what joined it during the hold never stops holding.)"""
    from clipper.query import batching

    t = h(max_batch=8, batch_delay_ms=20)
    r = Replica(1)
    t.queue.add_replica(r)
    t.query([1000], age_ms=2)
    t.query([1001], age_ms=1)  # gaps of 1 ms so far: the rate gate says "hold"
    first = t.next_batch()
    t.queue.deliver(r, first, [0.0] * len(first.queries))
    for k in range(8):
        _round(t, r, 0, 10 * k)
    held = t.queue.delayed_batches
    assert held <= 4, f"{held} of 9 batches held"  # the first 2-3 holds measure; then none
    assert t.queue.hold_gain < batching.MIN_HOLD_GAIN
    assert t.queue._gap_ewma_ns < 20 * MS  # the rate gate alone would still hold


def test_holds_that_gather_queries_go_on_and_a_probe_brings_holding_back(h, monkeypatch):
    """Arrivals during each hold (an open stream) keep holding on; after holding stopped, a probe hold
    (here at once: HOLD_PROBE_NS = 0) that gathers queries turns it back on. (Mutation: never probing
    once the gain is low leaves the probe round unheld, a batch of 1.)"""
    from clipper.query import batching

    monkeypatch.setattr(batching, "HOLD_PROBE_NS", 0)
    t = h(max_batch=8, batch_delay_ms=20)
    r = Replica(1)
    t.queue.add_replica(r)
    t.query([1000], age_ms=2)
    t.query([1001], age_ms=1)
    first = t.next_batch()
    t.queue.deliver(r, first, [0.0] * len(first.queries))
    sizes = [len(_round(t, r, 3, 10 * k).queries) for k in range(4)]
    assert sizes == [4, 4, 4, 4] and t.queue.hold_gain >= batching.MIN_HOLD_GAIN
    held = t.queue.delayed_batches
    assert held >= 4  # each of them held for the 3 that followed
    t.queue.hold_gain = 0.0  # as after a stretch of holds that gathered nothing
    b = _round(t, r, 3, 100)  # the probe: held, and it gathers 3
    assert len(b.queries) == 4 and t.queue.delayed_batches == held + 1
    assert t.queue.hold_gain > 0.5
    b = _round(t, r, 3, 200)
    assert len(b.queries) == 4 and t.queue.hold_gain >= batching.MIN_HOLD_GAIN


# ------------------------------------------------------------------ batch sizes
def test_aimd_replica_grows_its_batch_under_the_budget(h):
    t = h(max_batch=64, batching="aimd", budget_ns=50 * MS)
    r = Replica(1)
    t.queue.add_replica(r)
    assert r.sizer.current == 1
    sizes = []
    for i in range(10):
        for j in range(64):
            t.query([i * 100 + j], lead=False)
        b = t.next_batch()
        sizes.append(len(b.queries))
        t.queue.deliver(r, b, [0.0] * len(b.queries))  # fast: far under the budget
        t.queue.fail_all(ModelError("next round"))
    assert sizes == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert t.queue.stats()["batch_sizes"] == [21]


def test_set_budget_reaches_every_replica(h):
    t = h(max_batch=64, batching="aimd", budget_ns=50 * MS)
    r1, r2 = Replica(1), Replica(2)
    t.queue.add_replica(r1)
    t.queue.add_replica(r2)
    t.queue.set_budget(7 * MS)
    assert r1.sizer.budget_ns == r2.sizer.budget_ns == 7 * MS


# ------------------------------------------------------------------ leaving, limits, estimates
def test_a_settled_item_leaves_the_queue_at_once_and_hands_its_reservation_on(h):
    t = h()
    leader = t.query([9])
    follower = t.query([9])
    other = t.query([8])
    assert t.queue.live == 2 and t.queue.bytes == 8
    leader.settle_elsewhere()  # its deadline, with no replica free
    assert follower.queue is t.queue and follower.token is not None  # the heir takes its place
    assert t.queue.live == 2 and t.queue.queries_left_unsent == 1
    follower.settle_elsewhere()
    other.settle_elsewhere()
    assert t.queue.live == 0 and t.queue.bytes == 0
    assert t.cache.lookup(1, np.asarray([9], np.float32), None)[0] == cache_mod.MISS  # given back
    r = Replica(1)
    t.queue.add_replica(r)
    t.settle()
    assert t.sent == []  # nothing answered is ever sent


def test_leftovers_are_compacted_so_the_deque_holds_live_items(h):
    t = h()
    t.queue.max_queue_length = 10_000
    items = [t.query([i], lead=False) for i in range(2000)]
    for q in items[:1900]:
        q.settle_elsewhere()
    assert t.queue.live == 100 and len(t.queue.pending) <= 2 * 100 + 300


def test_length_and_byte_limits_count_live_items_only(h):
    t = h()
    t.queue.max_queue_length = 3
    qs = [t.query([i], lead=False) for i in range(3)]
    with pytest.raises(QueueFullError, match="max_queue_length"):
        t.query([9], lead=False)
    qs[0].settle_elsewhere()
    t.query([9], lead=False)  # room again at once
    t.queue.max_queue_bytes = 12
    t.queue.max_queue_length = 100
    with pytest.raises(QueueFullError, match="max_queue_bytes"):
        t.query([10], lead=False)


def test_the_estimate_follows_queue_length_and_measured_latency_and_sees_a_stall(h):
    t = h(max_batch=4, budget_ns=5 * MS)
    r = Replica(1)
    t.queue.add_replica(r)
    now = time.monotonic_ns()
    assert t.queue.estimate_ns(now) is None  # no history yet: admit
    r.lat_ewma_ns = 2 * MS
    t.queue.replicas_changed()
    assert t.queue.estimate_ns(now) == pytest.approx(2 * MS)  # empty queue: one batch
    for i in range(8):
        t.query([i], lead=False)
    assert t.queue.estimate_ns(now) == pytest.approx(8 / (4 / (2 * MS)) + 2 * MS)  # two batches ahead, then its own
    b = t.next_batch()
    assert len(b.queries) == 4
    assert t.queue.estimate_ns(b.sent_ns + MS) == pytest.approx(4 / (4 / (2 * MS)) + 2 * MS + 1 * MS)
    assert t.queue.estimate_ns(b.sent_ns + 6 * MS) == float("inf")  # out 3x its latency and past the budget


def test_a_replica_well_under_its_budget_is_counted_at_the_batch_size_it_will_grow_to(h):
    t = h(max_batch=64, batching="aimd", budget_ns=50 * MS)
    r = Replica(1)
    t.queue.add_replica(r)
    r.lat_ewma_ns = 2 * MS  # batches of 1 so far, far under the 50 ms budget
    t.queue.replicas_changed()
    t.queue.max_queue_length = 1000
    for i in range(600):
        t.query([i], lead=False)
    now = time.monotonic_ns()
    assert t.queue.estimate_ns(now) == pytest.approx(600 / (64 / (2 * MS)) + 2 * MS)
    r.lat_ewma_ns = 45 * MS  # at its budget: it will not grow, today's size counts
    t.queue.replicas_changed()
    assert t.queue.estimate_ns(now) == pytest.approx(600 / (1 / (45 * MS)) + 45 * MS)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("queries"), st.integers(1, 70)),
    st.tuples(st.just("batch"), st.just(0)),
    st.tuples(st.just("done"), st.integers(100_000, 30_000_000)),  # a batch back after this many ns
    st.tuples(st.just("tick"), st.integers(0, 400_000)),  # the clock moves (within and past the memo)
), max_size=30), replicas=st.integers(1, 3))
def test_the_estimate_kept_between_replica_changes_is_what_a_fresh_look_gives(ops, replicas):
    # estimate_ns keeps its look at the replicas while none changes; whatever happens to the queue,
    # its answer must equal the one computed from scratch at the same instant.
    t = Harness(cache=False, max_batch=64, batching="aimd", budget_ns=10 * MS)
    try:
        t.queue.max_queue_length = 10_000
        reps = [Replica(i) for i in range(replicas)]
        for r in reps:
            t.queue.add_replica(r)
            r.lat_ewma_ns = (1 + r.replica_id) * MS
        t.queue.replicas_changed()
        now = time.monotonic_ns()
        for kind, arg in ops:
            if kind == "queries":
                for i in range(arg):
                    t.query([i], lead=False)
            elif kind == "batch" and t.queue.live and t.queue.free:
                t.next_batch()
            elif kind == "done":
                busy = [r for r in reps if r.batch is not None]
                if busy:
                    b = busy[0].batch
                    b.sent_ns -= arg  # it took that long
                    t.queue.deliver(busy[0], b, [0.0] * len(b.queries))
            elif kind == "tick":
                now += arg
            kept = t.queue.estimate_ns(now)
            t.queue._est_memo = None
            fresh = t.queue.estimate_ns(now)
            assert kept == fresh or kept == pytest.approx(fresh, rel=1e-9), (kind, kept, fresh)
    finally:
        t.close()


@settings(max_examples=150, deadline=None)
@given(lats=st.lists(st.floats(0.2, 40.0), min_size=1, max_size=3), busy=st.booleans(),
       live=st.integers(0, 400), more=st.integers(0, 400), slo_ms=st.floats(2.0, 200.0),
       wait_batches=st.floats(0.5, 8.0), lag_us=st.integers(0, 3000), standing=st.booleans())
def test_admissions_bound_on_queue_length_admits_only_what_a_full_estimate_admits(
        lats, busy, live, more, slo_ms, wait_batches, lag_us, standing):
    # admits() leaves the queue a length below which a query is admitted without estimating (until a
    # replica changes): every length under it must be one a full estimate at that instant admits.
    from clipper.query.processor import ADMIT, QueryProcessor

    t = Harness(cache=False, max_batch=64, batching="aimd", budget_ns=int(slo_ms * MS / 2))
    try:
        # standing: the queue has not been empty for admission_standing_ms (0 here), so the cap applies
        proc = QueryProcessor(t.loop, 1 << 20, 0, admission_wait_batches=wait_batches,
                              admission_standing_ms=0 if standing else 60_000)
        proc.loop_lag_ns = lag_us * 1000
        t.queue.max_queue_length = 10_000
        for i, lat in enumerate(lats):
            r = Replica(i)
            t.queue.add_replica(r)
            r.lat_ewma_ns = lat * MS
        t.queue.free.clear()
        if busy:
            for r in t.queue.replicas:
                r.batch = type("B", (), {"sent_ns": time.monotonic_ns() - MS // 10})()
        t.queue.replicas_changed()
        for i in range(live):
            t.query([i], lead=False)
        now = time.monotonic_ns()  # (after the queries' arrivals, as in the frontend)
        budget = int(slo_ms * MS)
        kind, _ = proc.admits(t.queue, now, budget)
        if kind != ADMIT:
            return
        bound = t.queue.admit_below
        if live:  # the length it was admitted at is under its own bound (an empty queue's may be 0 or less:
            assert bound > live - 1  # the next query, making the queue standing at once, is estimated)
        if live == 0:
            t.queue.nonempty_since_ns = now  # (what submit does for the query that makes it non-empty)
        for extra in range(min(more, max(0, bound - 1 - live)) + 1):
            if live + extra >= bound:
                break
            t.queue.live = live + extra
            # at that instant and a moment later (an empty queue made non-empty now is standing by then when
            # admission_standing_ms is 0: its bound must already be the capped one)
            for at in (now, now + 1):
                t.queue._est_memo = None
                assert proc.admits(t.queue, at, budget)[0] == ADMIT, (live + extra, bound, at - now)
    finally:
        t.close()


def test_a_failing_answer_flush_still_frees_the_replica(h):
    # on_answered raising (a reply write failing) is logged; the batch still leaves its replica, so the
    # queue goes on sending to it.
    t = h(max_batch=1)
    r = Replica(1)

    def boom():
        raise RuntimeError("the write failed")

    t.queue.on_answered = boom
    t.queue.add_replica(r)
    q1 = t.query([1])
    b1 = t.next_batch()
    t.queue.deliver(r, b1, [1.0])
    assert t.app.outcomes[q1.query_id] == ("result", 1.0) and r.batch is None
    q2 = t.query([2])
    assert t.next_batch().queries == [q2]


def test_the_early_answer_flush_is_not_counted_as_the_batch_latency(h):
    # The batch's latency (what the sizer, the latency average and admission learn) ends when its
    # outputs are settled, before on_answered writes the replies: a slow write is not the model's time.
    t = h(max_batch=1)
    r = Replica(1)
    t.queue.on_answered = lambda: time.sleep(0.05)
    t.queue.add_replica(r)
    t.query([1])
    b = t.next_batch()
    t.queue.deliver(r, b, [1.0])
    assert t.queue.last_batch_latency_ns < 40 * MS, t.queue.last_batch_latency_ns


def test_the_bound_left_by_an_empty_queue_is_capped_when_it_will_stand_at_once():
    # With admission_standing_ms = 0 a queue counts as overloaded (capped at admission_wait_batches batch
    # latencies of queued work) as soon as it holds a query. A query arriving at the empty queue of a busy
    # replica is admitted by the SLO alone; the bound it leaves must already be the capped one, else the
    # queries right behind it (the rest of a burst, read a moment later) are admitted past the cap without
    # an estimate: seen in CI, all of a 12-query burst served where 2-5 belong.
    from clipper.query.processor import ADMIT, QueryProcessor

    t = Harness(cache=False, max_batch=1, batching="fixed", budget_ns=30_000 * MS)
    try:
        proc = QueryProcessor(t.loop, 1 << 20, 0, admission_wait_batches=2, admission_standing_ms=0)
        r = Replica(1)
        t.queue.add_replica(r)
        r.lat_ewma_ns = 100 * MS
        t.queue.free.clear()
        now = time.monotonic_ns()
        r.batch = type("B", (), {"sent_ns": now - MS})()  # busy: one batch of ~100 ms out
        t.queue.replicas_changed()
        assert proc.admits(t.queue, now, 30_000 * MS)[0] == ADMIT  # the SLO (30 s) alone: admitted
        bound = t.queue.admit_below
        t.queue.nonempty_since_ns = now  # that query made the queue non-empty
        for n in range(1, max(bound, 1)):  # every length the bound admits without an estimate...
            t.queue.live = n
            t.queue._est_memo = None
            # ... a full estimate a moment later admits too
            assert proc.admits(t.queue, now + 1, 30_000 * MS)[0] == ADMIT, (n, bound)
        assert bound <= 5, bound
    finally:
        t.close()
