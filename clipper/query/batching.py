"""Model queues and batches: the first form of Clipper's batching.

One :class:`ModelQueue` per deployed model version, shared by its replicas.
When a replica is free it takes up to its ``max_batch`` live queries from the
head of the queue. Queries whose deadline passed while they waited are
dropped here, before dispatch. Dispatch runs once per event-loop iteration
(``call_soon``), so everything that arrived in one read is batched together.

Seams for adaptive batching: each replica carries its own ``max_batch``; a
``batch_sizer`` may change it after every batch from the measured latency;
delayed batching will hook into :meth:`ModelQueue._dispatch`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from ..errors import ClipperError, ContainerFailedError, QueueFullError

if TYPE_CHECKING:  # pragma: no cover
    from ..rpc.server import Replica

__all__ = ["Query", "Batch", "ModelQueue"]


class Query:
    """One predict request on its way through the frontend."""

    __slots__ = ("conn", "req_id", "query_id", "app", "input", "arrival_ns", "deadline_ns", "done", "attempts")

    def __init__(self, conn, req_id, query_id, app, x, arrival_ns, deadline_ns):
        self.conn = conn  # who gets the answer: an object with finish_query(q, output, is_default, extra) / fail_query(q, exc)
        self.req_id = req_id  # the client's request id
        self.query_id = query_id  # the frontend's id for this query
        self.app = app  # the route (application) it belongs to
        self.input = x  # validated input: numpy array, bytes or str
        self.arrival_ns = arrival_ns
        self.deadline_ns = deadline_ns
        self.done = False  # answered (result, default, or error)
        self.attempts = 0  # times sent to a container


class Batch:
    __slots__ = ("batch_id", "queries", "replica", "sent_ns")

    def __init__(self, batch_id: int, queries: list, replica, sent_ns: int):
        self.batch_id = batch_id
        self.queries = queries
        self.replica = replica
        self.sent_ns = sent_ns


class ModelQueue:
    """The queue of one model version, shared by its replicas."""

    def __init__(self, key: str, loop, send_batch: Callable, *, max_queue_length: int, max_batch_retries: int,
                 default_max_batch: int):
        self.key = key
        self.loop = loop
        self._send_batch = send_batch  # (replica, batch) -> None; raises on a dead replica
        self.max_queue_length = max_queue_length
        self.max_batch_retries = max_batch_retries
        self.default_max_batch = default_max_batch
        self.pending: deque[Query] = deque()
        self.replicas: list = []
        self.free: deque = deque()
        self._scheduled = False
        self._next_batch_id = 1
        # observable figures
        self.batches_sent = 0
        self.queries_sent = 0
        self.queries_expired_in_queue = 0
        self.last_batch_size = 0
        self.last_batch_latency_ns = 0

    # ------------------------------------------------------------ queries
    def submit(self, q: Query) -> None:
        if len(self.pending) >= self.max_queue_length:
            raise QueueFullError(
                f"model {self.key} has {len(self.pending)} queries queued; max_queue_length is {self.max_queue_length}"
            )
        self.pending.append(q)
        if self.free and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        pending = self.pending
        now = time.monotonic_ns()
        while self.free and pending:
            replica = self.free.popleft()
            if replica.dead:
                continue
            limit = replica.max_batch
            queries = []
            while pending and len(queries) < limit:
                q = pending.popleft()
                if q.done:
                    continue
                if q.deadline_ns <= now:
                    self.queries_expired_in_queue += 1
                    q.app.expire(q)
                    continue
                queries.append(q)
            if not queries:
                self.free.appendleft(replica)
                break
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

    # ------------------------------------------------------------ replicas
    def add_replica(self, replica) -> None:
        if replica.max_batch is None:
            replica.max_batch = self.default_max_batch
        self.replicas.append(replica)
        self.replica_free(replica)

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
                f"the container of model {self.key} (replica {replica.replica_id}, pid {replica.pid}) "
                f"{reason} while it held this query"))

    def _requeue_or_fail(self, batch: Batch, exc: ClipperError) -> None:
        retry = []
        for q in batch.queries:
            if q.done:
                continue
            if q.attempts <= self.max_batch_retries:
                retry.append(q)
            else:
                q.app.fail(q, exc)
        # Retried queries go back to the head, in their original order.
        self.pending.extendleft(reversed(retry))
        if retry and self.free and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    # ------------------------------------------------------------ results
    def batch_done(self, replica, batch: Batch) -> None:
        """Book-keeping once a batch's answers (or error) were delivered."""
        replica.batch = None
        self.last_batch_size = len(batch.queries)
        self.last_batch_latency_ns = time.monotonic_ns() - batch.sent_ns
        if not replica.dead:
            self.replica_free(replica)

    def fail_all(self, exc: ClipperError) -> None:
        """Fail every waiting query (the model is being removed)."""
        while self.pending:
            q = self.pending.popleft()
            if not q.done:
                q.app.fail(q, exc)

    def stats(self) -> dict:
        return {
            "queue_length": len(self.pending),
            "replicas": len(self.replicas),
            "free_replicas": len(self.free),
            "batches_sent": self.batches_sent,
            "queries_sent": self.queries_sent,
            "mean_batch_size": (self.queries_sent / self.batches_sent) if self.batches_sent else 0.0,
            "last_batch_size": self.last_batch_size,
            "last_batch_latency_ms": self.last_batch_latency_ns / 1e6,
            "expired_in_queue": self.queries_expired_in_queue,
        }
