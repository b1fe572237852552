"""Model queues and batches: Clipper's batching layer.

One :class:`ModelQueue` per deployed model version, shared by its replicas.
When a replica is free it takes up to its current batch size of live queries
from the head of the queue; each replica's batch size is tuned after every
batch by its :class:`~clipper._native.batcher.BatchSizer` (AIMD, quantile
regression or fixed) against the model's latency budget.

A queue holds queue items (:class:`~clipper.query.ticket.Query` or
:class:`~clipper.query.ticket.Part`; see :mod:`clipper.query.ticket` for a
query's whole life). An item settled elsewhere (at its deadline, say) leaves
the queue at once (:meth:`ModelQueue.forget`): it stops counting against the
queue's length and bytes, its cache reservation is handed on, and the deque
is compacted once more than half of it is such leftovers. So a queue only
ever holds queries still waiting for an answer, even while no replica is
free.

Admission: :meth:`ModelQueue.estimate_ns` says how long a query queued now
would take to be answered, from the queue's length and each replica's
measured batch latency and batch size; the query processor refuses a query
whose estimate passes its deadline, at arrival, instead of queueing work
that can only time out.

Delayed batching (``batch_delay_ms`` > 0): while a free replica's batch would
not be full, the queue waits up to the delay, measured from the oldest queued
query's arrival, for more queries -- but only while queries arrive faster than
one per delay (an EWMA of inter-arrival gaps), so at low load nothing waits,
and only while holding has been seen to pay: each hold's gain (the queries that
joined the batch while it was held) is measured, and once the smoothed gain
falls below ``MIN_HOLD_GAIN`` queries the queue stops holding, trying one hold
per ``HOLD_PROBE_NS`` to see whether that changed. A closed-loop client waiting
for the very answer being held sends nothing meanwhile: its holds gain nothing,
so it is not held (the arrival rate alone would hold it every other query: the
hold slows its next arrival, which stops the holding, which speeds it up...).
Holding is the queue's decision (its arrivals, one timer), so the gain is
learned per queue. One timer per queue; nothing polls.

Two batches per replica (``batches_in_flight`` = 2): a replica with one batch
out sits in ``half`` and takes a second only when a whole batch (its batch
size) waits in the queue; its container reads it while running the first and
starts it the moment it answers, so no round trip passes idle between
batches under load, while at light load nothing changes. The second batch's
latency counts from the first one's answer (``Batch.sent_ns`` moves there):
that is the service time the sizer and admission learn, not the time it sat
behind the first. A replica lost with two batches out has both retried, in
order.

With the prediction cache, a queued item may *lead* a cache reservation
(``token``) that other items joined (``followers``). The leader's outcome is
theirs too; a leader that leaves the queue unsent hands the reservation to its
first live follower (which takes its place in the queue), or gives it back to
the cache, so no later query waits on a computation that will never happen.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

import numpy as np

from .._native import batcher as _batcher
from ..metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, Histogram
from ..errors import ClipperError, ContainerFailedError, QueueFullError
from .ticket import Part, Query  # noqa: F401  (re-exported: the items this queue holds)

__all__ = ["Query", "Part", "Batch", "ModelQueue"]

log = logging.getLogger("clipper.query")

_COMPACT_MIN = 256  # leftovers (settled, unsent items) tolerated in a deque before it is compacted
_EWMA = 0.2  # weight of a new batch latency in a replica's average
_INF = float("inf")
# Delayed batching holds a batch only while holds gather at least MIN_HOLD_GAIN more queries (smoothed with
# HOLD_GAIN_WEIGHT per hold, starting at INITIAL_HOLD_GAIN so that holding is tried); else one probe hold per
# HOLD_PROBE_NS (a lone closed-loop client at 2,000 queries/s: one held query in 200).
MIN_HOLD_GAIN = 1.0
INITIAL_HOLD_GAIN = 2.0
HOLD_GAIN_WEIGHT = 0.25
HOLD_PROBE_NS = 100_000_000
_EST_MEMO_NS = 200_000  # estimate_ns reuses its look at the replicas this long while none changes


class Batch:
    """One batch out to a replica. ``sent_ns``: when its container could start it -- when it was sent,
    or, for a batch sent behind another (``batches_in_flight`` = 2), when that one's answer arrived.
    Its latency (what the batch sizer and admission learn) and its batch timeout count from there."""

    __slots__ = ("batch_id", "queries", "replica", "sent_ns", "out_ns")

    def __init__(self, batch_id: int, queries: list, replica, sent_ns: int):
        self.batch_id = batch_id
        self.queries = queries
        self.replica = replica
        self.sent_ns = sent_ns
        self.out_ns = sent_ns  # when it was sent (sent_ns moves for a batch sent behind another)


class ModelQueue:
    """The queue of one model version, shared by its replicas."""

    def __init__(self, key: str, loop, send_batch: Callable, *, deployment_id: int = 0, max_queue_length: int,
                 max_batch_retries: int, max_batch: int, batching: str = "aimd", batch_delay_ms: float = 0.0,
                 budget_ns: int = 50_000_000, cache=None, max_queue_bytes: int = 1 << 62,
                 batches_in_flight: int = 1, on_answered: Callable[[], None] | None = None):
        self.key = key
        self.loop = loop
        self._send_batch = send_batch  # (replica, batch) -> None; raises on a dead replica
        # Writes the replies queued so far (the frontend's QueryServer.flush_dirty); deliver calls it when
        # nothing waits behind the batch it answered, before that batch's bookkeeping.
        self.on_answered = on_answered
        self.deployment_id = deployment_id  # the cache's name for this deployment
        self.max_queue_length = max_queue_length
        self.max_queue_bytes = max_queue_bytes
        self.max_batch_retries = max_batch_retries
        self.max_batch = max_batch
        self.batching = batching
        self.delay_ns = int(batch_delay_ms * 1_000_000)
        self.budget_ns = budget_ns
        self.cache = cache
        self.pending: deque = deque()  # items, in order; some may be leftovers (item.queue is not self)
        self.live = 0  # items waiting in pending (unsent, unsettled)
        self.bytes = 0  # their input bytes
        self.leftovers = 0  # items in pending that left it (settled elsewhere), to be skipped
        self.refusing_until_ns = 0  # admission refused a moment ago: it refuses until then without re-estimating
        self.refusing_kind = 0  # and why (processor.REFUSE_*)
        self.refusing_budget_ns = 0  # the budget of the application refused (an SLO refusal holds for shorter ones)
        self.est_lat_ns = 0.0  # the shortest replica batch latency the last estimate_ns used
        # estimate_ns's last look at the replicas (valid while replica_version is unchanged, for _EST_MEMO_NS):
        # (version, at_ns, drain rate, shortest latency, when the soonest busy replica is free)
        self._est_memo: tuple | None = None
        self.replica_version = 0  # bumped whenever a replica's state changes (batch out or back, added, removed)
        self.est_rate = 0.0  # the drain rate (queries per ns) the last estimate used
        # Admission's shortcut (QueryProcessor.admits): while replica_version is admit_version and
        # before admit_until_ns, a query arriving at a queue shorter than admit_below is admitted.
        self.admit_below = 0
        self.admit_budget_ns = 0
        self.nonempty_since_ns = 0  # when the queue last went from empty to not (see admits: overloaded)
        self.refused_at_ns = -(1 << 62)  # when admission last refused a query of this queue (never yet)
        self.admit_version = -1
        self.admit_until_ns = 0
        self.replicas: list = []
        self.free: deque = deque()  # replicas with no batch out
        if batches_in_flight not in (1, 2):
            raise ValueError(f"batches_in_flight {batches_in_flight!r} is not 1 or 2")
        self.depth = batches_in_flight
        self.half: deque = deque()  # depth 2: replicas with one batch out, which may take a second
        self._scheduled = False
        self._next_batch_id = 1
        self._delay_timer = None
        self._delay_due = False
        self._last_arrival_ns = 0
        self._gap_ewma_ns = float("inf")
        self._holding = False  # a hold is on: the batch it ends is measured
        self._hold_live = 0  # the queue's length when the hold began
        self.hold_gain = INITIAL_HOLD_GAIN  # queries a hold gathers, smoothed (see MIN_HOLD_GAIN)
        self._probe_at_ns = 0  # while holding does not pay: when to try one hold again
        # observable figures
        self.batches_sent = 0
        self.queries_sent = 0
        self.queries_expired_in_queue = 0
        self.queries_left_unsent = 0  # settled while queued (their deadline, a fan-out done, ...)
        self.delayed_batches = 0
        self.wait_ns_total = 0
        self.wait_ns_max = 0
        self.last_batch_size = 0
        self.last_batch_latency_ns = 0
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.batch_latency = Histogram(LATENCY_BUCKETS_S)

    # ------------------------------------------------------------ items
    def submit(self, q) -> None:
        """Queue ``q``; QueueFullError when the queue is at its length or byte limit."""
        if self.live >= self.max_queue_length:
            raise QueueFullError(
                f"model {self.key} has {self.live} queries queued; max_queue_length is {self.max_queue_length}")
        if self.bytes + q.nbytes > self.max_queue_bytes:
            raise QueueFullError(
                f"model {self.key} holds {self.bytes} bytes of queued inputs; max_queue_bytes is "
                f"{self.max_queue_bytes}")
        q.queue = self
        if not self.live:
            self.nonempty_since_ns = q.arrival_ns  # a standing queue is one not empty for a while
        self.live += 1
        self.bytes += q.nbytes
        self.pending.append(q)
        if self.delay_ns:  # the arrival rate decides whether waiting can gather more
            now = q.arrival_ns
            last = self._last_arrival_ns
            self._last_arrival_ns = now
            if last:
                gap = now - last
                ewma = self._gap_ewma_ns
                self._gap_ewma_ns = gap if ewma == float("inf") else 0.875 * ewma + 0.125 * gap
        if not self._scheduled and (self.free or (self.half and self.live >= self._half_need())):
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _half_need(self) -> int:
        """The fewest queued queries that let a replica of ``half`` take a second batch."""
        return min(r.sizer.current for r in self.half)

    def _wake(self) -> None:
        """Items came back to the queue: dispatch if a replica can take them."""
        if not self._scheduled and self.live and (self.free or (self.half and self.live >= self._half_need())):
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _requeue(self, q) -> None:
        """Put ``q`` back at the head (a retry, or an heir taking its leader's place)."""
        if not self.live:
            self.nonempty_since_ns = time.monotonic_ns()
        q.queue = self
        self.live += 1
        self.bytes += q.nbytes
        self.pending.appendleft(q)

    def _take(self, q) -> None:
        """``q`` leaves the queue to be sent or answered now."""
        q.queue = None
        self.live -= 1
        self.bytes -= q.nbytes

    def forget(self, q) -> None:
        """``q`` was settled while it waited here unsent: it leaves the queue now.

        Its reservation goes to a live follower, which takes its place;
        the deque is compacted when leftovers make up more than half of it.
        """
        if q.queue is not self:
            return
        self._take(q)
        self.queries_left_unsent += 1
        self.leftovers += 1
        heir = self._retire(q)
        if heir is not None:
            self._requeue(heir)
            self._wake()
        if self.leftovers > _COMPACT_MIN and 2 * self.leftovers > len(self.pending):
            self.pending = deque(x for x in self.pending if x.queue is self)
            self.leftovers = 0

    def _should_wait(self, replica, now: int) -> bool:
        """Delayed batching: hold a not-full batch for more queries?"""
        if self._delay_due or self.live >= replica.sizer.current or self._gap_ewma_ns >= self.delay_ns:
            return False
        if not self._holding and self.hold_gain < MIN_HOLD_GAIN and now < self._probe_at_ns:
            return False  # holds have not paid lately: no hold until the next probe
        head = next((x for x in self.pending if x.queue is self), None)
        if head is None:
            return False
        wake = head.arrival_ns + self.delay_ns
        if now >= wake:
            return False
        if not self._holding:
            self._holding = True
            self._hold_live = self.live
            if self.hold_gain < MIN_HOLD_GAIN:
                self._probe_at_ns = now + HOLD_PROBE_NS  # this hold is the probe
        if self._delay_timer is None:
            self._delay_timer = self.loop.call_later((wake - now) / 1e9, self._on_delay)
        return True

    def _on_delay(self) -> None:
        self._delay_timer = None
        self._delay_due = True  # the timer is the judge: send what is there, even if its clock ran early
        self._dispatch()

    def _dispatch(self) -> None:
        self._scheduled = False
        pending = self.pending
        now = time.monotonic_ns()
        free = self.free
        half = self.half
        while self.live:
            if free:
                replica = free[0]
                if replica.dead:
                    free.popleft()
                    continue
                if self.delay_ns and self._should_wait(replica, now):
                    return
                free.popleft()
                second = False
            elif half:
                # A replica with a batch out takes a second only when a whole batch waits: its container
                # starts it the moment it answers the first (no round trip idle between them), and a
                # queue shorter than a batch is better left to grow into the next one.
                replica = None
                for r in half:
                    if r.dead or r.batch is None or r.batch2 is not None:
                        replica = r  # not one that can take a second batch: out of half
                        break
                    if self.live >= r.sizer.current:
                        replica = r
                        break
                if replica is None:
                    break
                half.remove(replica)
                if replica.dead or replica.batch is None or replica.batch2 is not None:
                    continue
                second = True
            else:
                break
            limit = replica.sizer.current
            queries: list = []
            wait_total = 0
            while pending and len(queries) < limit:
                q = pending.popleft()
                if q.queue is not self:  # a leftover: settled while it waited
                    self.leftovers -= 1
                    continue
                self._take(q)
                if q.deadline_ns <= now:  # due now: its deadline timer is about to answer it
                    self.queries_expired_in_queue += 1
                    heir = self._retire(q)
                    if heir is not None:
                        self._requeue(heir)
                    q.on_expired()
                    continue
                queries.append(q)
                wait_total += now - q.arrival_ns
            if not queries:
                (half if second else free).appendleft(replica)
                break
            if self._delay_due:
                self._delay_due = False
                self.delayed_batches += 1
            if self._holding:  # the held batch leaves (its delay is over, or it filled): what did it gain?
                self._holding = False
                gain = len(queries) - min(self._hold_live, limit)
                self.hold_gain += HOLD_GAIN_WEIGHT * ((gain if gain > 0 else 0) - self.hold_gain)
            oldest_wait = now - queries[0].arrival_ns
            if oldest_wait > self.wait_ns_max:
                self.wait_ns_max = oldest_wait
            self.wait_ns_total += wait_total
            batch = Batch(self._next_batch_id, queries, replica, now)
            self._next_batch_id += 1
            for q in queries:
                q.attempts += 1
            if second:
                replica.batch2 = batch
            else:
                replica.batch = batch
            self.replica_version += 1
            try:
                self._send_batch(replica, batch)
            except Exception as exc:  # the replica vanished under us: requeue and drop it
                if second:
                    replica.batch2 = None
                else:
                    replica.batch = None
                self._requeue_or_fail(batch, ContainerFailedError(f"sending a batch to replica {replica} failed: {exc}"))
                replica.dead = True
                continue
            self.batches_sent += 1
            self.queries_sent += len(queries)
            if not second and self.depth > 1:
                half.append(replica)
        if not self.live:
            self._delay_due = False
            self._holding = False  # (a hold whose queries all expired measures nothing)

    def _retire(self, q):
        """``q`` leaves the queue unsent: pass its cache reservation on.

        Returns the follower that now leads it (to be queued in ``q``'s place),
        or None after giving the reservation back to the cache.
        """
        token = q.token
        if token is None:
            return None
        followers = q.followers
        q.token = q.followers = None
        if followers:
            live = [f for f in followers if not f.done]
            if live:
                heir = live[0]
                heir.token = token
                heir.followers = live[1:] or None
                self.cache.set_leader(token, heir)
                return heir
        self.cache.fail(token)
        return None

    # ------------------------------------------------------------ admission
    def estimate_ns(self, now: int) -> float | None:
        """How long a query queued now would take to be answered, in ns; None: no estimate yet.

        ``live / rate + latency``: the items ahead of it divided by the
        queue's drain rate (each replica's batch size over its measured batch
        latency; a replica well under its latency budget counted at the batch
        size it will grow to), plus one batch for its own (plus, when every
        replica is busy, the least time one of them still needs). A replica whose batch
        is out longer than twice its usual latency (and the latency budget)
        is stalled and drains nothing; with no replica draining, the answer
        is infinite.
        """
        replicas = self.replicas
        live = self.live
        # A replica whose batches take well under the budget will grow its batch size (the sizer's
        # job): count it at the size the queue would give it, up to max_batch, not at today's size.
        share = min(self.max_batch, max(1, live // max(1, len(replicas))))
        memo = self._est_memo
        if (memo is None or memo[0] != self.replica_version or now - memo[1] >= _EST_MEMO_NS
                or now >= memo[6]):
            memo = self._look(now)
            if memo is None:
                return None  # a replica without history: no estimate yet (admit)
        _, _, fixed_rate, growable, lat_min, busy_until, _ = memo
        # Nothing changed among the replicas since that look (no batch sent or back): what they drain
        # is as measured then; only the queue's length (so the size growable replicas will reach) and
        # the clock moved.
        rate = fixed_rate
        for size, lat in growable:
            rate += (share if size < share else size) / lat
        if rate <= 0.0:
            return _INF
        self.est_rate = rate
        est = live / rate + lat_min
        if busy_until > now:
            est += busy_until - now
        return est

    def _look(self, now: int):
        """estimate_ns's look at the replicas, kept in ``_est_memo`` while none changes (for at most
        ``_EST_MEMO_NS``, and not past the moment a busy replica would count as stalled): (version,
        when, drain rate of the replicas that will not grow, (batch size, latency) of those that may,
        the shortest latency, when the soonest busy replica is free when all are busy, else 0, that
        moment). None when a replica has no measured latency yet."""
        fixed_rate = 0.0
        growable = []
        lat_min = 0.0
        residual = -1.0
        busy = 0
        replicas = self.replicas
        grow_below = 0.8 * self.budget_ns
        stall_at = _INF  # when the first busy replica not yet stalled would count as stalled
        for r in replicas:
            lat = r.lat_ewma_ns
            if lat <= 0.0:
                self._est_memo = None
                return None
            b = r.batch
            if b is not None:
                age = now - b.sent_ns
                if age > 2.0 * lat and age > self.budget_ns:
                    continue  # stalled: drains nothing
                at = b.sent_ns + max(2.0 * lat, self.budget_ns)
                if at < stall_at:
                    stall_at = at
                busy += 1
                rem = lat - age
                if r.batch2 is not None:
                    rem += lat  # and the batch queued behind it
                if residual < 0.0 or rem < residual:
                    residual = rem
            size = r.sizer.current
            if lat < grow_below:
                growable.append((size, lat))
            else:
                fixed_rate += size / lat
            if lat_min == 0.0 or lat < lat_min:
                lat_min = lat
        self.est_lat_ns = lat_min
        busy_until = now + residual if busy == len(replicas) and residual > 0.0 else 0
        memo = self._est_memo = (self.replica_version, now, fixed_rate, tuple(growable), lat_min, busy_until,
                                 stall_at)
        return memo

    def replicas_changed(self) -> None:
        """A replica's figures changed outside the queue's own paths (its batches sent and back,
        replicas added and removed): the next :meth:`estimate_ns` looks at the replicas again."""
        self.replica_version += 1

    # ------------------------------------------------------------ replicas
    def make_sizer(self):
        return _batcher.BatchSizer(self.batching, budget_ns=self.budget_ns, max_batch=self.max_batch,
                                   initial=1 if self.batching != "fixed" else self.max_batch)

    def add_replica(self, replica) -> None:
        replica.sizer = self.make_sizer()
        replica.lat_ewma_ns = 0.0
        self.replicas.append(replica)
        self.replica_version += 1
        self.replica_free(replica)

    def set_budget(self, budget_ns: int) -> None:
        """The latency budget changed (an SLO or a link changed)."""
        budget_ns = max(1, int(budget_ns))
        if budget_ns == self.budget_ns:
            return
        self.budget_ns = budget_ns
        self.replica_version += 1
        for r in self.replicas:
            r.sizer.budget_ns = budget_ns

    def replica_free(self, replica) -> None:
        self.free.append(replica)
        if self.live and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def remove_replica(self, replica, reason: str) -> None:
        """Drop ``replica``; its batch in flight is retried or failed."""
        self.replica_version += 1
        if replica in self.replicas:
            self.replicas.remove(replica)
        for pool in (self.free, self.half):
            try:
                pool.remove(replica)
            except ValueError:
                pass
        batch, second = replica.batch, replica.batch2
        replica.batch = replica.batch2 = None
        # Retried in order: the second batch's queries go back to the head first, then the first's before them.
        for b in (second, batch):
            if b is not None:
                self._requeue_or_fail(b, ContainerFailedError(
                    f"the container of model {self.key} (replica {replica.replica_id}"
                    f"{'' if replica.pid is None else f', pid {replica.pid}'}) {reason} while it held this query"))

    def _requeue_or_fail(self, batch: Batch, exc: ClipperError) -> None:
        retry = []
        for q in batch.queries:
            if q.done:  # settled while out: only a reservation others wait on is worth computing again
                heir = self._retire(q)
                if heir is not None:
                    retry.append(heir)
            elif q.attempts <= self.max_batch_retries:
                retry.append(q)
            else:
                self._fail_query(q, exc)
        # Retried items go back to the head, in their original order.
        for q in reversed(retry):
            self._requeue(q)
        if retry:
            self._wake()

    # ------------------------------------------------------------ outcomes
    def deliver(self, replica, batch: Batch, outputs) -> None:
        """A batch's outputs arrived: answer its items and their followers, fill the cache."""
        cache = self.cache
        for q, out in zip(batch.queries, outputs):
            token = q.token
            if token is not None:
                if type(out) is np.ndarray and out.base is not None:
                    out = out.copy()  # a row of the batch's buffer: own it, so the cache holds only its bytes
                cache.fill(token, out)  # late answers fill it too
                q.token = None
                followers = q.followers
                if followers is not None:
                    q.followers = None
                    for f in followers:
                        if not f.done:
                            f.on_output(out)
            if not q.done:
                q.on_output(out)
        now = time.monotonic_ns()  # the batch's end: the writes below are not the model's time
        if not self.live and self.on_answered is not None:
            # Nothing waits for the replica: the answers go out now, the batch's bookkeeping after them.
            # (With queries waiting, _batch_done sends the next batch first and the replies go out with
            # the loop turn's other replies.)
            try:
                self.on_answered()
            except Exception:  # a failed write must not keep the batch on its replica
                log.exception("writing the answers of batch %d failed", batch.batch_id)
        self._batch_done(replica, batch, observe=True, now=now)

    def fail_batch(self, replica, batch: Batch, exc: ClipperError) -> None:
        """The model failed the batch: fail its items and their followers."""
        for q in batch.queries:
            self._fail_query(q, exc)
        self._batch_done(replica, batch, observe=False)

    def _fail_query(self, q, exc: ClipperError) -> None:
        token = q.token
        if token is not None:
            self.cache.fail(token)
            q.token = None
            followers = q.followers
            if followers is not None:
                q.followers = None
                for f in followers:
                    if not f.done:
                        f.on_error(exc)
        if not q.done:
            q.on_error(exc)

    def _batch_done(self, replica, batch: Batch, observe: bool, now: int | None = None) -> None:
        if now is None:
            now = time.monotonic_ns()
        if batch is replica.batch:
            nxt = replica.batch2
            replica.batch = nxt
            if nxt is not None:  # the batch sent behind it: its container starts it now
                replica.batch2 = None
                if nxt.sent_ns < now:
                    nxt.sent_ns = now
        elif batch is replica.batch2:  # (answered out of order)
            replica.batch2 = None
        self.replica_version += 1
        n = len(batch.queries)
        latency = now - batch.sent_ns
        if batch.sent_ns != batch.out_ns:
            # Sent behind another batch, its latency counted from that one's answer. When the loop was late,
            # both answers are read in one go and that gap says nothing of the batch; but the container ran
            # at most the two batches since this one was sent, so it took at least about half that time.
            half_out = (now - batch.out_ns) // 2
            if latency < half_out:
                latency = half_out
        self.last_batch_size = n
        self.last_batch_latency_ns = latency
        self.batch_sizes.observe(n)
        self.batch_latency.observe_ns(latency)
        if observe:
            replica.sizer.observe(n, latency)
            ewma = replica.lat_ewma_ns
            replica.lat_ewma_ns = float(latency) if ewma <= 0.0 else ewma + _EWMA * (latency - ewma)
        if not replica.dead:
            if replica.batch is None:
                if self.depth > 1:
                    try:
                        self.half.remove(replica)
                    except ValueError:
                        pass
                self.replica_free(replica)
            elif replica.batch2 is None and self.depth > 1 and replica not in self.half:
                self.half.append(replica)  # one batch still out: it may take a second
                self._wake()

    def fail_all(self, exc: ClipperError) -> None:
        """Fail every waiting item (the model is being removed, or the frontend stops)."""
        pending, self.pending = self.pending, deque()
        self.leftovers = 0
        for q in pending:
            if q.queue is self:
                self._take(q)
                self._fail_query(q, exc)

    def close(self) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None

    def stats(self) -> dict:
        sent = self.queries_sent
        return {
            "deployment_id": self.deployment_id,
            "queue_length": self.live,
            "queue_bytes": self.bytes,
            "replicas": len(self.replicas),
            "free_replicas": len(self.free),
            "batches_in_flight": self.depth,
            "batching": self.batching,
            "max_batch": self.max_batch,
            "batch_delay_ms": self.delay_ns / 1e6,
            "latency_budget_ms": self.budget_ns / 1e6,
            "batch_sizes": [r.sizer.current for r in self.replicas],
            "batch_latency_ewma_ms": [round(r.lat_ewma_ns / 1e6, 3) for r in self.replicas],
            "batches_sent": self.batches_sent,
            "queries_sent": sent,
            "mean_batch_size": (sent / self.batches_sent) if self.batches_sent else 0.0,
            "last_batch_size": self.last_batch_size,
            "last_batch_latency_ms": self.last_batch_latency_ns / 1e6,
            "mean_queue_wait_ms": (self.wait_ns_total / sent / 1e6) if sent else 0.0,
            "max_queue_wait_ms": self.wait_ns_max / 1e6,
            "delayed_batches": self.delayed_batches,
            "hold_gain": round(self.hold_gain, 3),
            "expired_in_queue": self.queries_expired_in_queue,
            "left_unsent": self.queries_left_unsent,
        }
