"""Model queues and batches: Clipper's batching layer.

One :class:`ModelQueue` per deployed model version, shared by its replicas.
When a replica is free it takes up to its current batch size of live queries
from the head of the queue; each replica's batch size is tuned after every
batch by its :class:`~clipper._native.batcher.BatchSizer` (AIMD, quantile
regression or fixed) against the model's latency budget.

Delayed batching (``batch_delay_ms`` > 0): while a free replica's batch would
not be full, the queue waits up to the delay, measured from the oldest queued
query's arrival, for more queries -- but only while queries arrive faster than
one per delay (an EWMA of inter-arrival gaps), so at low load nothing waits.
One timer per queue; nothing polls.

Queries whose deadline passed while they waited are never sent: they get
their outcome (default output or deadline error) at once.

With the prediction cache, a queued query may *lead* a cache reservation
(``token``) that other queries joined (``followers``). The leader's outcome
is theirs too; a leader that leaves the queue unsent hands the reservation to
its first live follower, or gives it back to the cache, so no later query
waits on a computation that will never happen.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from .._native import batcher as _batcher
from ..metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, Histogram
from ..errors import ClipperError, ContainerFailedError, QueueFullError

__all__ = ["Query", "Batch", "ModelQueue"]


class Query:
    """One predict request on its way through the frontend."""

    __slots__ = ("conn", "req_id", "query_id", "app", "input", "arrival_ns", "deadline_ns", "done", "attempts",
                 "token", "followers", "part", "extra")

    def __init__(self, conn, req_id, query_id, app, x, arrival_ns, deadline_ns):
        self.conn = conn  # the connection that gets the answer (send_result / send_error)
        self.req_id = req_id  # the client's request id
        self.query_id = query_id  # the frontend's id for this query
        self.app = app  # the route (application) it belongs to
        self.input = x  # validated input: numpy array, bytes or str
        self.arrival_ns = arrival_ns
        self.deadline_ns = deadline_ns
        self.done = False  # answered (result, default, or error)
        self.attempts = 0  # times sent to a container
        self.token = None  # the cache reservation this query leads, if any
        self.followers = None  # queries that joined that reservation
        self.part = 0  # in a Fanout (several models answer one request): this model's index
        self.extra = None  # single-model path: the RESULT extra naming the version it was sent to


class Batch:
    __slots__ = ("batch_id", "queries", "replica", "sent_ns")

    def __init__(self, batch_id: int, queries: list, replica, sent_ns: int):
        self.batch_id = batch_id
        self.queries = queries
        self.replica = replica
        self.sent_ns = sent_ns


class ModelQueue:
    """The queue of one model version, shared by its replicas."""

    def __init__(self, key: str, loop, send_batch: Callable, *, deployment_id: int = 0, max_queue_length: int,
                 max_batch_retries: int, max_batch: int, batching: str = "aimd", batch_delay_ms: float = 0.0,
                 budget_ns: int = 50_000_000, cache=None):
        self.key = key
        self.loop = loop
        self._send_batch = send_batch  # (replica, batch) -> None; raises on a dead replica
        self.deployment_id = deployment_id  # the cache's name for this deployment
        self.max_queue_length = max_queue_length
        self.max_batch_retries = max_batch_retries
        self.max_batch = max_batch
        self.batching = batching
        self.delay_ns = int(batch_delay_ms * 1_000_000)
        self.budget_ns = budget_ns
        self.cache = cache
        self.pending: deque[Query] = deque()
        self.replicas: list = []
        self.free: deque = deque()
        self._scheduled = False
        self._next_batch_id = 1
        self._delay_timer = None
        self._delay_due = False
        self._last_arrival_ns = 0
        self._gap_ewma_ns = float("inf")
        # observable figures
        self.batches_sent = 0
        self.queries_sent = 0
        self.queries_expired_in_queue = 0
        self.delayed_batches = 0
        self.wait_ns_total = 0
        self.wait_ns_max = 0
        self.last_batch_size = 0
        self.last_batch_latency_ns = 0
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.batch_latency = Histogram(LATENCY_BUCKETS_S)

    # ------------------------------------------------------------ queries
    def submit(self, q: Query) -> None:
        pending = self.pending
        if len(pending) >= self.max_queue_length:
            raise QueueFullError(
                f"model {self.key} has {len(pending)} queries queued; max_queue_length is {self.max_queue_length}"
            )
        pending.append(q)
        if self.delay_ns:  # the arrival rate decides whether waiting can gather more
            now = q.arrival_ns
            last = self._last_arrival_ns
            self._last_arrival_ns = now
            if last:
                gap = now - last
                ewma = self._gap_ewma_ns
                self._gap_ewma_ns = gap if ewma == float("inf") else 0.875 * ewma + 0.125 * gap
        if self.free and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _should_wait(self, replica, now: int) -> bool:
        """Delayed batching: hold a not-full batch for more queries?"""
        pending = self.pending
        if self._delay_due or len(pending) >= replica.sizer.current or self._gap_ewma_ns >= self.delay_ns:
            return False
        wake = pending[0].arrival_ns + self.delay_ns
        if now >= wake:
            return False
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
        while self.free and pending:
            replica = self.free[0]
            if replica.dead:
                self.free.popleft()
                continue
            if self.delay_ns and self._should_wait(replica, now):
                return
            self.free.popleft()
            limit = replica.sizer.current
            queries = []
            wait_total = 0
            while pending and len(queries) < limit:
                q = pending.popleft()
                if q.done or q.deadline_ns <= now:  # answered at its deadline already, or due now
                    self.queries_expired_in_queue += 1
                    if not q.done:
                        q.app.expire(q)
                    heir = self._retire(q)
                    if heir is not None:
                        pending.appendleft(heir)
                    continue
                queries.append(q)
                wait_total += now - q.arrival_ns
            if not queries:
                self.free.appendleft(replica)
                break
            if self._delay_due:
                self._delay_due = False
                self.delayed_batches += 1
            oldest_wait = now - queries[0].arrival_ns
            if oldest_wait > self.wait_ns_max:
                self.wait_ns_max = oldest_wait
            self.wait_ns_total += wait_total
            batch = Batch(self._next_batch_id, queries, replica, now)
            self._next_batch_id += 1
            for q in queries:
                q.attempts += 1
            replica.batch = batch
            try:
                self._send_batch(replica, batch)
            except Exception as exc:  # the replica vanished under us: requeue and drop it
                replica.batch = None
                self._requeue_or_fail(batch, ContainerFailedError(f"sending a batch to replica {replica} failed: {exc}"))
                replica.dead = True
                continue
            self.batches_sent += 1
            self.queries_sent += len(queries)
        if not pending:
            self._delay_due = False

    def _retire(self, q: Query):
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

    # ------------------------------------------------------------ replicas
    def make_sizer(self):
        return _batcher.BatchSizer(self.batching, budget_ns=self.budget_ns, max_batch=self.max_batch,
                                   initial=1 if self.batching != "fixed" else self.max_batch)

    def add_replica(self, replica) -> None:
        replica.sizer = self.make_sizer()
        self.replicas.append(replica)
        self.replica_free(replica)

    def set_budget(self, budget_ns: int) -> None:
        """The latency budget changed (an SLO or a link changed)."""
        budget_ns = max(1, int(budget_ns))
        if budget_ns == self.budget_ns:
            return
        self.budget_ns = budget_ns
        for r in self.replicas:
            r.sizer.budget_ns = budget_ns

    def replica_free(self, replica) -> None:
        self.free.append(replica)
        if self.pending and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def remove_replica(self, replica, reason: str) -> None:
        """Drop ``replica``; its batch in flight is retried or failed."""
        if replica in self.replicas:
            self.replicas.remove(replica)
        try:
            self.free.remove(replica)
        except ValueError:
            pass
        batch = replica.batch
        replica.batch = None
        if batch is not None:
            self._requeue_or_fail(batch, ContainerFailedError(
                f"the container of model {self.key} (replica {replica.replica_id}"
                f"{'' if replica.pid is None else f', pid {replica.pid}'}) {reason} while it held this query"))

    def _requeue_or_fail(self, batch: Batch, exc: ClipperError) -> None:
        retry = []
        for q in batch.queries:
            if q.attempts <= self.max_batch_retries and not (q.done and not q.followers):
                retry.append(q)
            else:
                self._fail_query(q, exc)
        # Retried queries go back to the head, in their original order.
        self.pending.extendleft(reversed(retry))
        if retry and self.free and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    # ------------------------------------------------------------ outcomes
    def deliver(self, replica, batch: Batch, outputs) -> None:
        """A batch's outputs arrived: answer its queries and their followers, fill the cache."""
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
                            f.app.finish(f, out)
            if not q.done:
                q.app.finish(q, out)
        self._batch_done(replica, batch, observe=True)

    def fail_batch(self, replica, batch: Batch, exc: ClipperError) -> None:
        """The model failed the batch: fail its queries and their followers."""
        for q in batch.queries:
            self._fail_query(q, exc)
        self._batch_done(replica, batch, observe=False)

    def _fail_query(self, q: Query, exc: ClipperError) -> None:
        token = q.token
        if token is not None:
            self.cache.fail(token)
            q.token = None
            followers = q.followers
            if followers is not None:
                q.followers = None
                for f in followers:
                    if not f.done:
                        f.app.fail(f, exc)
        if not q.done:
            q.app.fail(q, exc)

    def _batch_done(self, replica, batch: Batch, observe: bool) -> None:
        replica.batch = None
        n = len(batch.queries)
        latency = time.monotonic_ns() - batch.sent_ns
        self.last_batch_size = n
        self.last_batch_latency_ns = latency
        self.batch_sizes.observe(n)
        self.batch_latency.observe_ns(latency)
        if observe:
            replica.sizer.observe(n, latency)
        if not replica.dead:
            self.replica_free(replica)

    def fail_all(self, exc: ClipperError) -> None:
        """Fail every waiting query (the model is being removed)."""
        while self.pending:
            self._fail_query(self.pending.popleft(), exc)

    def close(self) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None

    def stats(self) -> dict:
        sent = self.queries_sent
        return {
            "deployment_id": self.deployment_id,
            "queue_length": len(self.pending),
            "replicas": len(self.replicas),
            "free_replicas": len(self.free),
            "batching": self.batching,
            "max_batch": self.max_batch,
            "batch_delay_ms": self.delay_ns / 1e6,
            "latency_budget_ms": self.budget_ns / 1e6,
            "batch_sizes": [r.sizer.current for r in self.replicas],
            "batches_sent": self.batches_sent,
            "queries_sent": sent,
            "mean_batch_size": (sent / self.batches_sent) if self.batches_sent else 0.0,
            "last_batch_size": self.last_batch_size,
            "last_batch_latency_ms": self.last_batch_latency_ns / 1e6,
            "mean_queue_wait_ms": (self.wait_ns_total / sent / 1e6) if sent else 0.0,
            "max_queue_wait_ms": self.wait_ns_max / 1e6,
            "delayed_batches": self.delayed_batches,
            "expired_in_queue": self.queries_expired_in_queue,
        }
