"""A query's life: one owner from arrival to answer.

Every request that is not answered on the spot (a cache hit, a refusal, an
application without a model) becomes a :class:`Ticket`. The ticket owns what
the request holds: its reply sink, its input (and the input bytes counted
against the frontend's budget), its deadline, and, through its queue items,
its places in model queues and its cache reservations. It ends in exactly one
call, :meth:`Ticket.settle`, which

1. marks it done (a second settle does nothing: the first outcome wins);
2. takes its unsent items out of their queues (their cache reservations go
   to a live follower, or back to the cache);
3. gives back its input bytes and drops its input;
4. counts the outcome and sends it to the sink.

::

                         arrival
                            |
           cache hit / refused / no model: answered on the spot (no ticket)
                            |
                            v
                  +------ QUEUED ------+  items in model queues (or following a
                  |         |          |  computation already queued: a join)
          deadline|  dispatch (sent)   |settle by another path (fan-out done,
                  |         v          |  application removed, drain)
                  |      IN FLIGHT     |
                  |    /    |     \\    |
                  |  output error  container lost --> QUEUED again (retry)
                  v    v    v                       or error
                 settle(ANSWER | DEFAULT | ERROR | FEEDBACK_OK)
                            |
                            v
                          DONE   input dropped, bytes released, unsent items
                                 out of their queues; a sent item's late
                                 output still fills the cache

A deadline never waits for a replica: at ``arrival + answer_ns`` the
application's timer settles the ticket (default output, deadline error, or
for a fan-out the combination of what arrived), and its unsent items leave
their queues at that moment, so a queue never holds answered queries.

Two kinds of queue item share one small protocol (:class:`QueueItem`):

* :class:`Query`, the single-model request: the ticket and its one queue
  item in one object (the hot path allocates nothing else);
* :class:`Part`, one model's share of a fan-out (``clipper.query.processor.Fanout``).

A queue calls ``on_output``, ``on_error`` or ``on_expired`` on an item and
reads its ``input``, ``nbytes``, ``arrival_ns``, ``deadline_ns``,
``attempts``, ``token`` and ``followers``; it sets ``queue`` while the item
waits in it, unsent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ClipperError

if TYPE_CHECKING:
    from ..protocol.wire import PackedExtra
    from .batching import ModelQueue
    from .processor import AppRoute

__all__ = ["ANSWER", "DEFAULT", "ERROR", "FEEDBACK_OK", "ReplySink", "QueueItem", "Ticket", "Query", "Part"]

# How a ticket ends.
ANSWER = 0  # the model's (or the combined) output
DEFAULT = 1  # the application's default output, flagged as such
ERROR = 2  # a typed error
FEEDBACK_OK = 3  # feedback learned from


class ReplySink(Protocol):
    """Where a request's one answer goes: a msgpack connection, or one REST request."""

    def send_result(self, req_id, query_id: int, output, is_default: bool, extra) -> None: ...

    def send_error(self, req_id, exc: ClipperError) -> None: ...

    def send_feedback_ok(self, req_id, info: dict | None) -> None: ...


class QueueItem(Protocol):
    """What a model queue holds (a :class:`Query` or a :class:`Part`)."""

    input: object
    nbytes: int
    arrival_ns: int
    deadline_ns: int
    done: bool
    attempts: int
    token: object
    followers: list | None
    queue: object

    def on_output(self, output) -> None: ...

    def on_error(self, exc: ClipperError) -> None: ...

    def on_expired(self) -> None: ...


class Ticket:
    """One client request, from arrival until :meth:`settle`."""

    __slots__ = ("sink", "req_id", "query_id", "route", "input", "nbytes", "arrival_ns", "deadline_ns", "done")
    # (the slots' types, for the type checker)
    sink: ReplySink
    req_id: Any
    query_id: int
    route: AppRoute
    input: Any
    nbytes: int
    arrival_ns: int
    deadline_ns: int
    done: bool

    is_feedback = False

    def settle(self, how: int, value=None, extra=None) -> bool:
        """End the request: the one place that answers it. Returns False if it had ended already.

        ``how`` is ANSWER (``value`` the output), DEFAULT (the application's
        default output; ``extra`` says why), ERROR (``value`` the exception)
        or FEEDBACK_OK (``value`` the info map).
        """
        if self.done:
            return False
        self.done = True
        self.release_items()
        route = self.route
        proc = route.processor
        proc.inflight_bytes -= self.nbytes
        proc.unsettled -= 1
        if proc.draining and not proc.unsettled:
            proc.on_idle()
        self.input = None
        sink, self.sink = self.sink, None  # type: ignore[assignment]  # dropped once settled (settle runs once)
        if how != FEEDBACK_OK and not self.is_feedback:
            route.latency.observe_ns(time.monotonic_ns() - self.arrival_ns)
        if how == ANSWER:
            route.answered += 1
            sink.send_result(self.req_id, self.query_id, value, False, extra)
        elif how == DEFAULT:
            route.defaults += 1
            sink.send_result(self.req_id, self.query_id, route.default_output, True, extra)
        elif how == ERROR:
            route.errors += 1
            sink.send_error(self.req_id, value)
        else:
            sink.send_feedback_ok(self.req_id, value)
        return True

    def release_items(self) -> None:
        """Take the ticket's unsent items out of their queues (a subclass knows its items)."""
        raise NotImplementedError


class Query(Ticket):
    """A request answered by one model: the ticket and its queue item in one object."""

    __slots__ = ("attempts", "token", "followers", "queue", "extra")
    attempts: int
    token: Any
    followers: list | None
    queue: ModelQueue | None
    extra: PackedExtra | dict | None

    def __init__(self, sink, req_id, query_id, route, x, nbytes: int, arrival_ns: int, deadline_ns: int) -> None:
        self.sink = sink  # where the answer goes (ReplySink)
        self.req_id = req_id  # the client's request id
        self.query_id = query_id  # the frontend's id for this query
        self.route = route  # the application (AppRoute): its counters, default output, deadlines
        self.input = x  # the validated input: numpy array, bytes or str (None once settled)
        self.nbytes = nbytes  # the input's bytes, counted in the frontend's in-flight budget
        self.arrival_ns = arrival_ns
        self.deadline_ns = deadline_ns
        self.done = False
        self.attempts = 0  # times sent to a container
        self.token = None  # the cache reservation this query leads, if any
        self.followers = None  # queries that joined that reservation
        self.queue = None  # the model queue it waits in, unsent (None: not queued)
        self.extra = None  # the RESULT extra naming the version it was sent to

    def on_output(self, output) -> None:
        self.settle(ANSWER, output, self.extra)

    def on_error(self, exc: ClipperError) -> None:
        self.settle(ERROR, exc)

    def on_expired(self) -> None:
        self.route.expire(self)

    def release_items(self) -> None:
        queue = self.queue
        if queue is not None:
            queue.forget(self)


class Part:
    """One selected model's share of a fan-out: a queue item reporting to its owner."""

    __slots__ = ("owner", "index", "input", "nbytes", "arrival_ns", "deadline_ns", "done", "attempts", "token",
                 "followers", "queue")

    def __init__(self, owner, index: int) -> None:
        self.owner = owner  # the Fanout (a Ticket)
        self.index = index  # which of its selected models
        self.input = owner.input
        self.nbytes = owner.nbytes
        self.arrival_ns = owner.arrival_ns
        self.deadline_ns = owner.deadline_ns
        self.done = False
        self.attempts = 0
        self.token = None
        self.followers = None
        self.queue = None

    def on_output(self, output) -> None:
        if not self.done:
            self.done = True
            self.owner.part_output(self, output)

    def on_error(self, exc: ClipperError) -> None:
        if not self.done:
            self.done = True
            self.owner.part_error(self, exc)

    def on_expired(self) -> None:
        if not self.done:
            self.done = True
            self.owner.part_expired(self)

    def leave(self) -> None:
        """The owner settled: stop waiting (an unsent part leaves its queue; a sent one's late
        output still fills the cache)."""
        self.done = True
        self.input = None
        queue = self.queue
        if queue is not None:
            queue.forget(self)
