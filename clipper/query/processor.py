"""The query processor: from a validated request to an answer.

For each application an :class:`AppRoute` checks inputs against the
application's type, asks its selection policy which linked models answer,
sends the query to those models' queues (through the prediction cache) and
holds the application's deadlines: at ``arrival + slo_ms`` whatever has not
answered is left out (straggler mitigation) and the policy combines what
arrived; with no answer at all the query gets the default output (or a
deadline error, per the application). No query ever waits forever.

Two paths:

* **one model** (the ``single`` policy): a query is one :class:`Query` in one
  model queue; the route itself receives its outcome. This is the hot path
  and allocates nothing beyond the query.
* **several models** (every other policy): a :class:`Fanout` stands for the
  client's request and receives the outcome of one sub-query per selected
  model; it answers when the last one is in, or at the deadline.

Feedback goes the second way too: the policy names the models whose
predictions it needs (from the cache when it holds them, else the models
compute them), and its ``observe`` turns label and predictions into the
user's new state.

Deadlines are kept in arrival order per application (all share one SLO), so
one timer per application suffices; feedback has a deque of its own.

Every request that is not answered on the spot is a ticket
(:mod:`clipper.query.ticket`: a :class:`~clipper.query.ticket.Query` or a
:class:`Fanout`) that ends in one call, ``settle``. Admission happens at
arrival: a query whose model queue cannot answer it before its deadline
(:meth:`ModelQueue.estimate_ns`), or whose input would pass the frontend's
in-flight byte budget, is refused on the spot -- OVERLOADED, or the default
output, as the application's ``on_overload`` says -- instead of being queued
to time out after its work was spent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    ClipperError,
    DeadlineExceededError,
    DTypeMismatchError,
    InputTooLargeError,
    InternalError,
    InvalidInputError,
    InvalidLabelError,
    LimitExceededError,
    ModelError,
    NoModelAvailableError,
    OverloadedError,
    ShapeMismatchError,
    ShuttingDownError,
    StateUnavailableError,
    UnknownApplicationError,
    UnknownModelError,
)
from ..management.registry import Application
from ..metrics import LATENCY_BUCKETS_S, Histogram
from .._native import framing as _framing
from .._native import framing_py as _framing_py
from ..protocol.wire import PackedExtra, brief, ndarray_ext_head, pack
from ..selection.policies import MISSING
from ..selection.policy import Policy, make_policy
from .batching import ModelQueue
from .ticket import ANSWER, DEFAULT, ERROR, FEEDBACK_OK, Part, Query, Ticket

if TYPE_CHECKING:
    from ..store.states import StateTable

log = logging.getLogger("clipper.query")

__all__ = ["AppRoute", "QueryProcessor", "Fanout"]

_QUEUED = object()  # _submit: the query waits for its model
_result_frame = _framing.result_frame
_error_frame = _framing.error_frame
_refuse_run = _framing.refuse_run
_default_run = _framing.default_run
_take_run = _framing.take_run
_floats_to_array = _framing.floats_to_array
_judge_list = _framing_py.judge_list  # (a decoded list: the Python walk, whichever framing is loaded)
_MAX_LIST_DIMS = _framing_py.MAX_NEST_DIMS
_REFUSAL_HOLD_NS = 200_000  # a refusal's estimate stands this long for the next queries of its queue
_ADMIT_HOLD_NS = 200_000  # an admission's bound on the queue's length stands this long (while no replica changes)
_INF = float("inf")
# Admission's decisions (QueryProcessor.admits): admitted, or refused and why.
ADMIT = 0
REFUSE_SLO = 1  # the model cannot answer it within its application's SLO
REFUSE_STALLED = 2  # no replica of the model is answering
REFUSE_QUEUE = 3  # the work queued ahead of it is longer than admission_wait_batches batch latencies


def overload_message(queue, route, kind: int, est: float | None) -> str:
    """The OVERLOADED message of a refusal of ``kind`` (``est``: the estimate in ns, when known)."""
    if kind == REFUSE_STALLED:
        return (f"no replica of model {queue.key} is answering now (none connected, or all stalled): "
                f"refused at arrival")
    said = f"estimated {est / 1e6:.1f} ms" if est is not None else "estimated from its queue and batch latency"
    if kind == REFUSE_QUEUE:
        return (f"model {queue.key} is at capacity: its queue holds more work than admission lets a query wait "
                f"behind ({said}; application {route.name!r}, SLO {route.slo_ns / 1e6:g} ms): refused at arrival")
    return (f"model {queue.key} cannot answer within the {route.slo_ns / 1e6:g} ms SLO of application "
            f"{route.name!r} ({said}): refused at arrival")


_MARGIN_STEP_NS = 250_000  # the adaptive deadline margin moves at most this much per re-plan


class Deadlines:
    """Items with a ``deadline_ns`` and a ``done`` flag, due in the order they were added.

    One timer for all of them; ``on_due(item)`` runs for each item still not
    done at its deadline, and ``on_late(ns)`` (if given) then learns how long
    after its deadline that item was answered.
    """

    __slots__ = ("loop", "on_due", "on_late", "items", "_timer")

    def __init__(self, loop, on_due, on_late=None) -> None:
        self.loop = loop
        self.on_due = on_due
        self.on_late = on_late
        self.items: deque = deque()
        self._timer: asyncio.TimerHandle | None = None

    def track(self, item) -> None:
        self.items.append(item)
        if self._timer is None:
            self._arm(item.deadline_ns)

    def _arm(self, deadline_ns: int) -> None:
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        self._timer = self.loop.call_at(self.loop.time() + max(delay, 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic_ns()
        dq = self.items
        while dq:
            item = dq[0]
            if item.done:
                dq.popleft()
            elif item.deadline_ns <= now + 500_000:  # within the timer's resolution
                dq.popleft()
                try:
                    self.on_due(item)
                except Exception:  # a bug answering one item must not strand the ones after it
                    log.exception("answering an item at its deadline failed")
                    continue
                if self.on_late is not None:
                    self.on_late(time.monotonic_ns() - item.deadline_ns)
            else:
                self._arm(item.deadline_ns)
                return

    def drain(self) -> None:
        """Answer every item still waiting, now (its owner is going away)."""
        self.close()
        dq = self.items
        while dq:
            item = dq.popleft()
            if not item.done:
                try:
                    self.on_due(item)
                except Exception:
                    log.exception("answering an item of a closing owner failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _StateWait:
    """A request waiting for its user's policy state (``QueryProcessor._wait_for_state``): it goes on
    exactly once, with the state, at its time limit, or failed by a shutdown."""

    __slots__ = ("proc", "conn", "req_id", "route", "nbytes", "go", "timer", "done")

    def __init__(self, proc, conn, req_id, route, nbytes: int, go) -> None:
        self.proc, self.conn, self.req_id, self.route, self.nbytes, self.go = proc, conn, req_id, route, nbytes, go
        self.timer = None
        self.done = False

    def _end(self) -> bool:
        if self.done:
            return False
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        proc = self.proc
        proc._state_waits.discard(self)
        proc.inflight_bytes -= self.nbytes
        proc.unsettled -= 1
        proc.waiting_for_state -= 1
        return True

    def resume(self, state, known: bool) -> None:
        if not self._end():
            return
        proc, route, conn, req_id = self.proc, self.route, self.conn, self.req_id
        try:
            if proc.routes.get(route.name) is not route or route.policy is None:
                raise NoModelAvailableError(f"application {route.name!r} was removed or changed while its "
                                            "policy state was read")
            self.go(state, known)
        except ClipperError as exc:
            conn.send_error(req_id, exc)
        except Exception as exc:  # a bug: fail the request, keep the connection
            log.exception("internal error on request %s", req_id)
            conn.send_error(req_id, InternalError(f"{type(exc).__name__}: {exc}"))
        if proc.draining and not proc.unsettled:
            proc.on_idle()

    def time_out(self, table) -> None:
        if not self.done:
            self.proc.state_wait_timeouts += 1
            self.timer = None
            self.resume(table.init(), False)

    def fail(self, exc: ClipperError) -> bool:
        if not self._end():
            return False
        self.conn.send_error(self.req_id, exc)
        return True


class Fanout(Ticket):
    """One client request answered by several models (a query, or feedback).

    Its :class:`~clipper.query.ticket.Part` items, one per selected model that
    has a queue, report each model's outcome here; the request is answered
    (:meth:`AppRoute.complete`) when the last one is in, or at the deadline.
    """

    __slots__ = ("user", "state", "names", "keys", "outputs", "errors", "remaining", "parts", "label", "is_feedback")

    def __init__(self, sink, req_id, query_id, route, x, nbytes, arrival_ns, deadline_ns, user, state, names, keys,
                 label=None, is_feedback=False) -> None:
        self.sink = sink
        self.req_id = req_id
        self.query_id = query_id
        self.route = route
        self.input = x
        self.nbytes = nbytes
        self.arrival_ns = arrival_ns
        self.deadline_ns = deadline_ns
        self.done = False
        self.user = user
        self.state = state  # the user's policy state when the query arrived
        self.names = names  # the selected models, as linked
        self.keys = keys  # their deployed versions (name:version), or None without a queue
        n = len(names)
        self.outputs = [MISSING] * n
        self.errors: list = [None] * n
        self.remaining = n
        self.parts: list = []
        self.label = label
        self.is_feedback = is_feedback

    # -- outcomes of the parts (each reports once)
    def part_output(self, part: Part, output) -> None:
        self.outputs[part.index] = output
        self._part_done()

    def part_error(self, part: Part, exc: ClipperError) -> None:
        self.errors[part.index] = exc
        self._part_done()

    def part_expired(self, part: Part) -> None:
        """The part's deadline passed in its queue (the fan-out's own deadline is due too)."""
        self._part_done()

    def _part_done(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0 and not self.done:
            self.route.complete(self, at_deadline=False)

    def release_items(self) -> None:
        for part in self.parts:
            part.leave()

    def missing(self) -> list[str]:
        """What did not answer: ``"key (reason)"`` per model."""
        out = []
        for i, name in enumerate(self.names):
            if self.outputs[i] is MISSING:
                key = self.keys[i] or name
                err = self.errors[i]
                out.append(f"{key} ({err.name}: {err.message})" if err is not None else f"{key} (no answer in time)")
        return out


class AppRoute:
    """One application on the query path."""

    def __init__(self, app: Application, processor: "QueryProcessor") -> None:
        self.processor = processor
        self.loop = processor.loop
        self.queue: ModelQueue | None = None  # the single-model path's queue
        self.links: list[tuple[str, ModelQueue | None]] = []  # (linked model, its queue) in link order
        self.queue_by_name: dict[str, ModelQueue | None] = {}
        self.policy: Policy | None = None
        self.states: StateTable | None = None  # for policies that learn
        self.simple = True
        self.single_extra: dict | None = None
        self.deadlines = Deadlines(self.loop, self.expire, self._note_lateness)
        self.late_ewma_ns = 0.0  # how late answers made at the deadline leave, smoothed
        self._late_notes = 0
        self.feedback_deadlines = Deadlines(self.loop, self._feedback_due)
        self.requests = 0
        self.answered = 0
        self.defaults = 0
        self.errors = 0
        self.cache_hits = 0
        self.cache_joins = 0
        self.partial = 0  # answered at the deadline without some selected model
        self.overloaded = 0  # refused at arrival by admission control (OVERLOADED or the default output)
        self.low_confidence = 0
        self.feedback = 0
        self.feedback_partial = 0
        self.latency = Histogram(LATENCY_BUCKETS_S)  # arrival to answer, every outcome
        self.configure(app)

    def configure(self, app: Application) -> None:
        self.app = app
        self.name = app.name
        self.name_bytes = app.name.encode("utf-8")  # what the msgpack fast path compares frames' heads with
        self.np_dtype = app.np_dtype
        self.shape = tuple(app.input_shape)
        self.variable = -1 in self.shape  # a free dimension: never taken by the array fast path
        self.int_app = app.np_dtype is not None and app.np_dtype.kind in "iub"  # takes no floats in a list
        self.rest_original = app.rest_format == "original"  # REST answers in the original Clipper's format
        self.opaque = app.input_dtype if self.np_dtype is None else None
        self.slo_ns = int(app.slo_ms * 1_000_000)
        # What is not answered by arrival + answer_ns is answered then, from what has arrived: a
        # margin before the SLO absorbs the timer's millisecond ticks and a busy loop, so the
        # answer still leaves within the SLO.
        self.base_margin_ns = min(self.processor.deadline_margin_ns, self.slo_ns // 10)
        self.answer_ns = self.slo_ns - self.base_margin_ns
        self.feedback_ns = max(self.slo_ns, self.processor.feedback_timeout_ns)
        self.default_output = app.default_output
        try:
            self.packed_default = pack(app.default_output)  # the fast refusal answers it without encoding
        except (TypeError, ValueError, OverflowError):
            self.packed_default = pack(None)
        self._overload_texts: dict = {}  # (queue key, stalled) -> (message, PackedExtra): the fast refusal's words
        # The largest frame a valid input could come in (an array as msgpack floats, 9 bytes each; a str or
        # bytes input up to max_input_bytes): bigger ones are judged in full (their error is not OVERLOADED).
        if app.np_dtype is not None and self.variable:
            self.max_valid_frame = 9 * (self.processor.max_input_bytes // app.np_dtype.itemsize) + 512
            self.ext_head = None
        elif app.np_dtype is not None:
            items = 1
            for d in app.input_shape:
                items *= d
            nbytes = items * app.np_dtype.itemsize
            self.max_valid_frame = -1 if nbytes > self.processor.max_input_bytes else 9 * items + 512
            # how every valid ndarray input's encoding begins: the msgpack port's array fast path
            self.ext_head = (ndarray_ext_head(app.np_dtype, self.shape)
                             if nbytes <= self.processor.max_input_bytes else None)
        else:
            self.max_valid_frame = self.processor.max_input_bytes + 512
            self.ext_head = None
        # a REST body {"input": [n numbers]} is parsed natively for a fixed-length float vector (n; 0: never)
        # (within max_input_bytes: a bigger input gets the full way's error, in its words)
        self.json_vector_len = (self.shape[0] if len(self.shape) == 1 and not self.variable and self.np_dtype
                                in (np.dtype(np.float32), np.dtype(np.float64))
                                and self.shape[0] * self.np_dtype.itemsize <= self.processor.max_input_bytes else 0)
        self.error_on_deadline = app.on_deadline == "error"
        self.default_on_overload = app.on_overload == "default"
        # how long after its arrival a refused query's default answer goes (0: at once; errors: at once)
        # (never closer to the SLO than its answer margin and a millisecond: the loop's timers tick in ms)
        self.refusal_hold_ns = (max(0, min(int(self.slo_ns * self.processor.default_refusal_hold),
                                           self.answer_ns - 1_000_000))
                                if self.default_on_overload and self.processor.default_refusal_hold > 0 else 0)
        self.use_cache = bool(app.cache)
        self.max_input_bytes = self.processor.max_input_bytes
        self.threshold = app.confidence_threshold
        self.default_on_low_confidence = app.on_low_confidence == "default"
        self.set_links(self.links, force=True)

    def set_links(self, links: list[tuple[str, ModelQueue | None]], force: bool = False) -> None:
        """The linked models (and the queues of their deployed versions) changed."""
        names = [n for n, _ in links]
        rebuild = force or self.policy is None or self.policy.models != names
        self.links = list(links)
        self.queue_by_name = dict(links)
        app = self.app
        self.simple = app.policy == "single"
        # The single-model path serves the first linked model that has a deployed version.
        self.queue = next((q for _, q in links if q is not None), None) if self.simple else None
        self.single_extra = (PackedExtra(confidence=1.0, models=[self.queue.key])
                             if self.queue is not None else None)
        if not rebuild:
            return
        if not names:
            self.policy = None
            return
        self.policy = make_policy(app.policy, names, output_kind=app.output_kind, loss=app.loss,
                                  options=app.policy_options)
        if self.policy.learns:
            self.states = self.processor.state_table(self.name, self.policy, self.states)
        else:
            self.states = None

    def describe(self) -> dict:
        """What a client needs to query this application (msgpack DESCRIBE, REST ``GET /<app>``): its input
        dtype (the config's name, and the wire's typestr for arrays), shape (-1: any length), SLO, output
        kind, default output and linked models."""
        from ..protocol.wire import _TYPESTR

        app = self.app
        dt = self.np_dtype
        return {"name": app.name, "input_dtype": app.input_dtype,
                "wire_dtype": _TYPESTR[dt].decode() if dt is not None else app.input_dtype,
                "input_shape": list(app.input_shape), "slo_ms": app.slo_ms, "slo_micros": int(app.slo_ms * 1000),
                "output_kind": app.output_kind, "default_output": app.default_output, "policy": app.policy,
                "linked_models": [name for name, _ in self.links]}

    # ------------------------------------------------------------ inputs
    def check_input(self, x):
        """Return ``x`` as the application's input type, or raise the error of the first rule it breaks.

        The rules and their order are docs/protocol.md section 4's: form (201),
        size (205), structure of a list (201), dtype (203), shape (204), values
        (201). The msgpack port judges list inputs by the same rules on the
        frame's bytes before decoding (``framing.check_nested``).
        """
        dt = self.np_dtype
        if dt is not None:
            if type(x) is np.ndarray:
                if x.nbytes > self.max_input_bytes:
                    raise InputTooLargeError(
                        f"input of {x.nbytes} bytes exceeds max_input_bytes={self.max_input_bytes}")
                if x.dtype != dt:
                    raise DTypeMismatchError(
                        f"input has dtype {x.dtype.name}; application {self.name!r} expects {dt.name}")
                if x.shape != self.shape and not self._fits(x.shape):
                    raise ShapeMismatchError(
                        f"input has shape {list(x.shape)}; application {self.name!r} expects {list(self.shape)}"
                        + (" (-1: any length)" if self.variable else ""))
                return x
            if type(x) is list:
                return self._convert_list(x)
            raise InvalidInputError(
                f"input is a {_kind(x)}; application {self.name!r} expects an array of {dt.name} "
                f"with shape {list(self.shape)} (an ndarray extension or a list of numbers)")
        if self.opaque == "bytes":
            if type(x) is not bytes:
                raise InvalidInputError(f"input is a {_kind(x)}; application {self.name!r} expects bytes")
        elif type(x) is not str:
            raise InvalidInputError(f"input is a {_kind(x)}; application {self.name!r} expects a str")
        n = len(x)
        if type(x) is str and 4 * n > self.max_input_bytes >= n:  # (a str's UTF-8 length: n to 4n bytes)
            n = len(x.encode("utf-8", "surrogatepass"))
        if n > self.max_input_bytes:
            raise InputTooLargeError(f"input of {n} bytes exceeds max_input_bytes={self.max_input_bytes}")
        return x

    def check_label(self, label) -> None:
        """Raise InvalidLabelError unless a FEEDBACK ``label`` fits the application's output kind
        (docs/protocol.md section 3): ``label`` a class (an integer or a str); ``probabilities`` a class
        index (an integer >= 0); ``number`` a finite number; ``vector`` 1 to max_input_bytes / 8 finite
        numbers (a list or a 1-D array); ``auto`` any of those. Bools, nil, maps, bytes, NaN and
        infinities fit none."""
        kind = self.app.output_kind
        t = type(label)
        if t is int:
            if kind != "vector" and (kind != "probabilities" or label >= 0):
                return
        elif t is str:
            if kind == "label" or kind == "auto":
                return
        elif t is float:
            if (kind == "number" or kind == "auto") and math.isfinite(label):
                return
        elif (t is list or t is np.ndarray) and (kind == "vector" or kind == "auto") and self._finite_vector(label):
            return
        want = {"label": "a class (an integer or a str)", "probabilities": "a class index (an integer >= 0)",
                "number": "a finite number", "vector": f"a vector of 1 to {self.max_input_bytes // 8} finite numbers",
                "auto": "a class (an integer or a str), a finite number, or a vector of finite numbers"}[kind]
        raise InvalidLabelError(f"label {brief(label)} ({_label_kind(label)}) does not fit application "
                                f"{self.name!r}, whose output_kind is {kind!r}: expected {want}")

    def _finite_vector(self, v) -> bool:
        if type(v) is np.ndarray and v.ndim != 1:  # (a 0-d array has no length: not a vector)
            return False
        n = len(v)
        if n == 0 or n > self.max_input_bytes // 8:
            return False
        if type(v) is np.ndarray:
            return v.dtype.kind in "iuf" and bool(np.isfinite(v).all())
        for x in v:
            t = type(x)
            if t is float:
                if not math.isfinite(x):
                    return False
            elif t is not int:
                return False
        return True

    def _fits(self, shape: tuple) -> bool:
        """``shape`` matches the application's, a free dimension (-1) taking any length."""
        return self.variable and len(shape) == len(self.shape) and all(
            w == -1 or g == w for g, w in zip(shape, self.shape))

    def _convert_list(self, x: list) -> np.ndarray:
        """A list input as an array of the application's dtype, judged in the order of check_input."""
        dt: np.dtype = self.np_dtype  # type: ignore[assignment]  # (lists are converted for numeric apps only)
        shape = self.shape
        if len(shape) == 1 and len(x) == shape[0] and len(x) * dt.itemsize <= self.max_input_bytes:
            # a flat list of numbers for a float32/float64 application (a REST body's input): converted in
            # one native pass; anything else (or None from it) goes the general way below
            arr = _floats_to_array(x, dt)
            if arr is not None:
                return arr
        try:
            arr = np.array(x)
        except (ValueError, TypeError, OverflowError):
            arr = None  # ragged, or values numpy cannot take: judged below
        if arr is None or arr.dtype.kind not in "biuf" or arr.ndim > _MAX_LIST_DIMS:
            bad = _judge_list(x, shape, dt.itemsize, self.max_input_bytes, dt.kind in "iub")
            if bad is not None:
                raise self.nested_error(bad)
            # regular numbers in shape, yet numpy could not take them: integers out of every range
            raise InvalidInputError(f"list input has values outside the range of {dt.name}")
        if arr.size * dt.itemsize > self.max_input_bytes:
            raise InputTooLargeError(f"list input of {arr.size} values ({arr.size * dt.itemsize} bytes as {dt.name}) "
                                     f"exceeds max_input_bytes={self.max_input_bytes}")
        kind = arr.dtype.kind
        if arr.size and kind == "f" and dt.kind in "iub":
            raise DTypeMismatchError(f"list input holds float values; application {self.name!r} expects {dt.name}")
        if arr.shape != shape and not self._fits(arr.shape):
            raise ShapeMismatchError(
                f"input has shape {list(arr.shape)}; application {self.name!r} expects {list(shape)}"
                + (" (-1: any length)" if self.variable else ""))
        if kind in "iu" and dt.kind in "iu":
            info = np.iinfo(dt)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise InvalidInputError(f"list input has values outside the range of {dt.name}")
        return np.ascontiguousarray(arr, dtype=dt)

    def overload_text(self, queue, kind: int) -> tuple[str, PackedExtra, bytes]:
        """The words of a fast refusal (made once per queue and kind, ``REFUSE_*``): the message, the
        RESULT extra, and the encoded tail of the ERROR message (code, name, message)."""
        got = self._overload_texts.get((queue.key, kind))
        if got is None:
            msg = overload_message(queue, self, kind, None)
            tail = pack(OverloadedError.code) + pack(OverloadedError.name) + pack(msg)
            got = self._overload_texts[(queue.key, kind)] = (
                msg, PackedExtra(explanation=msg, confidence=0.0, models=[]), tail)
        return got

    def nested_error(self, bad: tuple) -> ClipperError:
        """The error of a list input's verdict (``framing.check_nested`` on its bytes, ``judge_list`` on
        the decoded list): ``(code, detail)``."""
        code, detail = bad
        dt = self.np_dtype
        assert dt is not None  # (lists are judged for numeric applications only)
        if code == 205:
            n = detail * dt.itemsize
            return InputTooLargeError(f"list input of {detail} values ({n} bytes as {dt.name}) exceeds "
                                      f"max_input_bytes={self.max_input_bytes}")
        if code == 201:
            if detail == 0:
                return InvalidInputError(f"list input nests arrays more than {_MAX_LIST_DIMS} deep; application "
                                         f"{self.name!r} expects shape {list(self.shape)}")
            return InvalidInputError(f"list input is ragged (its arrays at one depth differ in length, or hold "
                                     f"arrays beside numbers): not an array; application {self.name!r} expects "
                                     f"shape {list(self.shape)}")
        if code == 203:
            return DTypeMismatchError(f"list input holds {_msgpack_kind(detail)} values; application {self.name!r} "
                                      f"expects {dt.name}")
        return ShapeMismatchError(f"input has shape {list(detail)}; application {self.name!r} expects "
                                  f"{list(self.shape)}" + (" (-1: any length)" if self.variable else ""))

    # ------------------------------------------------------------ outcomes
    def expire(self, t: Query | Fanout) -> None:
        """The ticket's deadline passed: answer with what there is."""
        if type(t) is Fanout:
            self.complete(t, at_deadline=True)
            return
        if self.error_on_deadline:
            t.settle(ERROR, DeadlineExceededError(
                f"no answer within the {self.slo_ns / 1e6:g} ms SLO of application {self.name!r}"))
        else:
            extra = t.extra or self.single_extra  # type: ignore[union-attr]  # a Query (a Fanout returned above)
            key = extra["models"][0] if extra else "the model"
            t.settle(DEFAULT, None, {"explanation": f"no answer within the {self.slo_ns / 1e6:g} ms SLO",
                                     "confidence": 0.0, "models": [], "missing": [f"{key} (no answer in time)"]})

    def track(self, q) -> None:
        self.deadlines.track(q)

    def _note_lateness(self, late_ns: int) -> None:
        """An answer made at its deadline left ``late_ns`` after it: plan the next ones earlier.

        The margin before the SLO is the configured one plus twice the smoothed
        lateness (a busy loop, a loaded machine), at most a quarter of the SLO;
        it is re-planned every 32 such answers, in steps small enough that the
        deadline queue stays in order within a fraction of a millisecond.
        """
        if not self.processor.adaptive_margin:
            return
        self.late_ewma_ns += 0.1 * (max(late_ns, 0) - self.late_ewma_ns)
        self._late_notes += 1
        if self._late_notes % 32 == 0:
            target = min(self.base_margin_ns + 2 * int(self.late_ewma_ns), self.slo_ns // 4)
            margin = self.slo_ns - self.answer_ns
            step = max(-_MARGIN_STEP_NS, min(_MARGIN_STEP_NS, target - margin))
            self.answer_ns = self.slo_ns - (margin + step)

    def complete(self, f: Fanout, at_deadline: bool) -> None:
        """Every selected model has answered or failed, or the deadline came: answer ``f``."""
        if f.done:
            return
        if not at_deadline and time.monotonic_ns() >= f.deadline_ns - 500_000:
            at_deadline = True  # the last part expired in its queue: the deadline came all the same
        if f.is_feedback:
            return self._complete_feedback(f, at_deadline)
        got = {}
        used = []
        for i, name in enumerate(f.names):
            out = f.outputs[i]
            if out is not MISSING:
                got[name] = out
                used.append(f.keys[i])
        missing = f.missing()
        if not got:
            errors = [e for e in f.errors if e is not None]
            if errors and all(type(e) is OverloadedError for e in errors):  # refused at arrival, every part
                self.overloaded += 1
                why = "; ".join(e.message for e in errors)
                if self.default_on_overload:
                    f.settle(DEFAULT, None, {"explanation": why, "confidence": 0.0, "models": [], "missing": missing})
                else:
                    f.settle(ERROR, OverloadedError(why))
                return
            if self.error_on_deadline:
                if not at_deadline and errors:
                    exc = errors[0] if len(errors) == 1 else ModelError(
                        "no selected model could answer: " + "; ".join(missing))
                else:
                    exc = DeadlineExceededError(
                        f"no answer within the {self.slo_ns / 1e6:g} ms SLO of application {self.name!r}: "
                        + "; ".join(missing))
                f.settle(ERROR, exc)
                return
            why = "no selected model answered within the SLO" if at_deadline else "no selected model could answer"
            f.settle(DEFAULT, None, {"explanation": f"{why} ({self.slo_ns / 1e6:g} ms): " + "; ".join(missing),
                                     "confidence": 0.0, "models": [], "missing": missing})
            return
        policy = self.policy
        if policy is None:  # the application lost its links while this query waited
            f.settle(ERROR, NoModelAvailableError(f"application {self.name!r} has no linked model any more"))
            return
        try:
            output, confidence = policy.combine(f.state, f.input, got)
            confidence = float(confidence)
        except ClipperError as exc:
            f.settle(ERROR, ModelError(f"the answers of {used} cannot be combined: {exc.message}"))
            return
        except Exception as exc:  # a policy's bug fails this query only
            log.exception("policy %s failed to combine", policy.name)
            f.settle(ERROR, InternalError(f"policy {policy.name!r} failed to combine: {type(exc).__name__}: {exc}"))
            return
        extra = {"confidence": confidence, "models": used}
        if missing:
            extra["missing"] = missing
            self.partial += 1
        if confidence < self.threshold:
            self.low_confidence += 1
            extra["low_confidence"] = True
            if self.default_on_low_confidence:
                extra["explanation"] = (f"confidence {confidence:.3g} is below the application's "
                                        f"confidence_threshold {self.threshold:g}")
                extra["combined_output"] = output
                f.settle(DEFAULT, None, extra)
                return
        f.settle(ANSWER, output, extra)

    def _feedback_due(self, f: Fanout) -> None:
        self.complete(f, at_deadline=True)

    def _complete_feedback(self, f: Fanout, at_deadline: bool) -> None:
        preds = {name: f.outputs[i] for i, name in enumerate(f.names)}
        missing = f.missing()
        if missing:
            self.feedback_partial += 1
        policy, states = self.policy, self.states
        if policy is None or states is None:  # the links or the policy changed while this feedback waited
            f.settle(ERROR, NoModelAvailableError(
                f"application {self.name!r} no longer has a learning policy over linked models"))
            return
        state = states.peek(f.user)
        if state is None:  # memory let it go while the feedback waited: read it again (off the loop)
            if not f.done:
                states.fetch(f.user, lambda st, known: self._learn(f, preds, missing, st, known))
            return
        self._learn(f, preds, missing, state, True)

    def _learn(self, f: Fanout, preds: dict, missing, state, known: bool) -> None:
        if f.done:  # (answered meanwhile: a shutdown)
            return
        policy, states = self.policy, self.states
        if policy is None or states is None:
            f.settle(ERROR, NoModelAvailableError(
                f"application {self.name!r} no longer has a learning policy over linked models"))
            return
        if not known:
            f.settle(ERROR, StateUnavailableError(
                f"the policy state of user {_short(f.user)} could not be read from the state store in time; "
                "nothing was learned"))
            return
        try:
            new = policy.observe(state, f.input, f.label, preds)
            if not isinstance(new, dict):
                raise InternalError(f"policy {policy.name!r} returned a {type(new).__name__} as its state; "
                                    f"a state is a dict")
            states.put(f.user, new)
        except ClipperError as exc:
            f.settle(ERROR, exc)
            return
        except Exception as exc:
            log.exception("policy %s failed to observe", policy.name)
            f.settle(ERROR, InternalError(
                f"policy {policy.name!r} failed to learn from feedback: {type(exc).__name__}: {exc}"))
            return
        info = {"models": [f.keys[i] for i, o in enumerate(f.outputs) if o is not MISSING]}
        if missing:
            info["missing"] = missing
        f.settle(FEEDBACK_OK, info)

    def close(self, drain: bool = False) -> None:
        """Stop the timers; with ``drain``, answer what still waits now (the application is going away)."""
        if drain:
            self.deadlines.drain()
            self.feedback_deadlines.drain()
        self.deadlines.close()
        self.feedback_deadlines.close()

    def stats(self) -> dict:
        out = {
            "requests": self.requests,
            "answered": self.answered,
            "defaults": self.defaults,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "cache_joins": self.cache_joins,
            "partial": self.partial,
            "overloaded": self.overloaded,
            "low_confidence": self.low_confidence,
            "feedback": self.feedback,
            "feedback_partial": self.feedback_partial,
            "policy": self.app.policy,
            "models": [[n, q.key if q is not None else None] for n, q in self.links],
            "model_queue": self.queue.key if self.queue else None,
            "answer_margin_ms": round((self.slo_ns - self.answer_ns) / 1e6, 3),
            "latency_p50_ms": _ms(self.latency.quantile(0.5)),
            "latency_p99_ms": _ms(self.latency.quantile(0.99)),
        }
        if self.states is not None:
            out["states"] = self.states.stats()
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _label_kind(x) -> str:
    if x is None:
        return "nil"
    if type(x) is dict:
        return "a map"
    if type(x) is float and not math.isfinite(x):
        return "not finite"
    return _kind(x)


def _kind(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype.name} array"
    return type(x).__name__


class QueryProcessor:
    """Routes queries from connections to model queues and back.

    With the prediction cache (``cache_bytes`` > 0) each query of an
    application that caches is first looked up by (deployment, input bytes):
    a hit is answered at once; a query whose input is already being computed
    joins that computation; a miss reserves the entry and goes to the queue.

    ``store`` keeps the policies' per-user states (a
    :class:`~clipper.store.StateStore`); changed states are written in one
    transaction at most every ``state_flush_ms``; a state not in memory is read
    off the event loop, the request waiting for it up to ``state_load_timeout_ms``.
    """

    def __init__(self, loop, max_input_bytes: int, cache_bytes: int = 0, *, store=None,
                 state_flush_ms: int = 100, feedback_timeout_ms: int = 1000, max_user_id_len: int = 256,
                 max_user_states: int = 100_000, max_user_states_in_memory: int = 10_000,
                 deadline_margin_ms: float = 2.0, adaptive_margin: bool = True, admission: bool = True,
                 admission_wait_batches: float = 2.0, admission_standing_ms: float = 1000.0,
                 default_refusal_hold: float = 0.0,
                 max_inflight_bytes: int = 1 << 62, state_load_timeout_ms: int = 1000) -> None:
        self.loop = loop
        self.admission = admission  # refuse at arrival what its model cannot answer in time
        # ... or would queue behind more than this many batch latencies of work (see admits)
        self.admission_wait_batches = float(admission_wait_batches)
        self.admission_standing_ns = int(admission_standing_ms * 1_000_000)  # ... once the queue stands this long
        # a default answer to a refusal goes this fraction of the SLO after its query arrived (AppRoute's
        # refusal_hold_ns; the msgpack port holds it: QueryServer.hold)
        self.default_refusal_hold = float(default_refusal_hold)
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0  # input bytes of every ticket not yet settled
        self.unsettled = 0  # tickets not yet settled
        self.refused_in_runs = 0  # OVERLOADED refusals made by shed_run (native, a run of frames at once)
        # the application shed last refused with OVERLOADED (its refusal may hold)
        self.refusing_route: AppRoute | None = None
        # The request shed just admitted (its route, id and connection; no tuple per request): predict
        # of that very frame skips admission; any other request clears it.
        self._shed_route: AppRoute | None = None
        self._shed_id = None
        self._shed_conn = None
        # The largest frame any registered application could take as a valid request (its input, and
        # room for the rest of the message); None: no bound beyond the port's max_frame_bytes. The
        # msgpack port skips a larger frame without buffering it, so a stream of 15 MB junk frames
        # costs a scan of their length, not their bytes copied.
        self.frame_bound: int | None = None
        # How late the event loop runs what is due (a busy loop reads requests that late): admission
        # leaves that much less of the SLO to the model queue. Measured only while queries flow.
        self.loop_lag_ns = 0
        self._lag_timer = None
        self._lag_due = 0.0
        self._lag_seen = 0  # requests when the probe last looked
        self.draining = False  # the frontend is stopping: new requests get SHUTTING_DOWN
        self._idle: asyncio.Event | None = None  # set when draining and nothing is left unsettled
        self.deadline_margin_ns = int(deadline_margin_ms * 1_000_000)
        self.adaptive_margin = adaptive_margin
        self.max_input_bytes = max_input_bytes
        self.routes: dict[str, AppRoute] = {}
        self.queues: dict[str, ModelQueue] = {}
        self._next_query_id = 1
        self.cache = None
        if cache_bytes > 0:
            from .._native import cache as _cache

            self.cache = _cache.PredictionCache(cache_bytes)
            self._HIT = _cache.HIT
            self._PENDING = _cache.PENDING
        if store is None:
            from ..store.sqlite import SQLiteStore

            store = SQLiteStore(":memory:")
        self.store = store
        self.state_flush_s = state_flush_ms / 1000
        self.state_load_timeout_s = state_load_timeout_ms / 1000
        self.waiting_for_state = 0  # requests waiting for their user's policy state to be read
        self._state_waits: set = set()  # ... their _StateWait
        self.state_wait_timeouts = 0  # ... that went on without it (their share of the deadline passed)
        self.feedback_timeout_ns = int(feedback_timeout_ms * 1_000_000)
        self.max_user_id_len = max_user_id_len
        self.max_user_states = max_user_states
        self.max_user_states_in_memory = max_user_states_in_memory
        self._tables: dict[str, StateTable] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self.state_flushes = 0
        self.state_flush_errors = 0

    # ------------------------------------------------------------ the largest valid request
    _FRAME_SLACK = 64 * 1024  # room for the message around the input (id, app, options, a feedback label)

    def route_added(self, route: "AppRoute") -> None:
        if route.max_valid_frame > 0:
            bound = route.max_valid_frame + self._FRAME_SLACK
            if self.frame_bound is None or bound > self.frame_bound:
                self.frame_bound = bound

    def route_removed(self) -> None:
        bounds = [r.max_valid_frame + self._FRAME_SLACK for r in self.routes.values() if r.max_valid_frame > 0]
        self.frame_bound = max(bounds) if bounds else self._FRAME_SLACK

    # ------------------------------------------------------------ states
    def state_table(self, app_name: str, policy: Policy, old=None):
        """The StateTable of an application for ``policy`` (``old`` is reset when there is one)."""
        from ..store.states import StateTable

        table = self._tables.get(app_name)
        if table is not None:
            self.flush_states()  # what the old policy learned is saved before memory is reset
        if table is None:
            table = StateTable(self.store, app_name, policy.name, policy.init, max_in_memory=self.max_user_states_in_memory,
                               max_states=self.max_user_states, on_dirty=self._states_dirty, loop=self.loop,
                               load_timeout_s=self.state_load_timeout_s, mergeable=policy.mergeable)
            self._tables[app_name] = table
        else:
            table.reset(policy.name, policy.init, policy.mergeable)
        return table

    def drop_states(self, app_name: str, *, in_store: bool = True) -> None:
        """The application is gone: its policy states go from memory, and from the store unless
        ``in_store`` is False (another frontend removed it and took its states with it)."""
        table = self._tables.pop(app_name, None)
        if not in_store:
            if table is not None:
                table.lru.clear()
                table.dirty.clear()
            return
        if table is not None:
            table.drop()
        else:
            self.store.delete_namespace(f"policy/{app_name}")

    def _states_dirty(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(self.state_flush_s, self.flush_states)

    def flush_states(self) -> None:
        """Write every changed state to the store (one transaction)."""
        self._flush_timer = None
        items: list = []
        taken: list = []
        merges: list = []
        its: list | None  # (bound by both loops below)
        for table in self._tables.values():
            merging = table.merging
            its, tk = table.take_dirty_merge() if merging else table.take_dirty()
            (merges if merging else items).extend(its)
            if tk:
                taken.append((table, tk, its if merging else None))
        if not items and not merges:
            return
        try:
            if merges:  # other frontends may write these users too: the store merges them (StateTable)
                self.store.merge_many(merges, self._on_merged)
                merges = []
            if items:
                self.store.save_many(items)
        except Exception:
            self.state_flush_errors += 1
            log.exception("saving %d policy states failed; trying again in %g s", len(items), self.state_flush_s)
            for table, tk, its in taken:
                if its is None or merges:  # (merges handed over already are not given back)
                    table.give_back(tk, its)
            self._states_dirty()
            return
        self.state_flushes += 1
        for table in self._tables.values():
            try:
                table.trim_if_due()
            except Exception:
                log.exception("trimming the policy states of %s failed", table.namespace)

    def _on_merged(self, merged: list) -> None:
        """(The store's thread.) Merged states were written: memory takes them, on the loop."""
        try:
            self.loop.call_soon_threadsafe(self._take_merged, merged)
        except RuntimeError:  # the loop is closed: nobody reads memory any more
            pass

    def _take_merged(self, merged: list) -> None:
        for ns, key, value, m in merged:
            table = self._tables.get(ns[len("policy/"):]) if ns.startswith("policy/") else None
            if table is not None and table.namespace == ns:
                table.merged(key, value, m)

    def close(self) -> None:
        if self._lag_timer is not None:
            self._lag_timer.cancel()
            self._lag_timer = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self.flush_states()
        if self._flush_timer is not None:  # the last save failed: nothing more can be done now
            self._flush_timer.cancel()
            self._flush_timer = None

    # ------------------------------------------------------------ requests
    def _user(self, options) -> str:
        if options is None:
            return ""
        if type(options) is not dict:
            raise InvalidInputError(f"options is a {type(options).__name__}; expected a map")
        user = options.get("user")
        if user is None:
            return ""
        if type(user) is not str:
            raise InvalidInputError(f"options.user is a {type(user).__name__}; expected a str")
        if len(user) > self.max_user_id_len:
            raise LimitExceededError(f"options.user has {len(user)} characters; max_user_id_len is "
                                     f"{self.max_user_id_len}")
        return user

    def _route(self, app_name) -> AppRoute:
        route = self.routes.get(app_name)
        if route is None:
            raise UnknownApplicationError(f"no application named {_short(app_name)} is registered")
        return route

    def predict(self, conn, req_id: int, app_name, x, options=None) -> None:
        """Start answering one query; raises a ClipperError for a request that cannot start.

        ``conn`` is the reply sink (:class:`~clipper.query.ticket.ReplySink`).
        """
        if self.draining:
            raise ShuttingDownError("the frontend is shutting down and takes no new queries")
        route = self.routes.get(app_name)
        if route is None:
            raise UnknownApplicationError(f"no application named {_short(app_name)} is registered")
        route.requests += 1
        try:
            x = route.check_input(x)
        except ClipperError:
            route.errors += 1  # a refused input is an outcome too (requests = answered + defaults + errors ...)
            raise
        self._start(conn, req_id, route, x, options)

    def version_queue(self, app_name, version) -> ModelQueue:
        """The queue of ``version`` of the model ``app_name`` is linked to (REST's per-query ``"version"``,
        the original Clipper's): an UnknownModelError when no linked model has that version deployed."""
        route = self._route(app_name)
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise InvalidInputError(f"version is a {_kind(version)}; expected a model version (a string)")
        version = str(version)
        names = []
        for link, _ in route.links:
            model = link.split(":", 1)[0]
            names.append(model)
            queue = self.queues.get(f"{model}:{version}")
            if queue is not None:
                return queue
        raise UnknownModelError(f"version {_short(version)} is not deployed for the model(s) linked to application "
                                f"{route.name!r} ({', '.join(names) or 'none linked'})")

    def predict_version(self, conn, req_id: int, app_name, x, queue: ModelQueue, options=None) -> None:
        """:meth:`predict` answered by one given model queue (a version picked by the query, from
        :meth:`version_queue`), past the application's policy and the prediction cache."""
        if self.draining:
            raise ShuttingDownError("the frontend is shutting down and takes no new queries")
        route = self._route(app_name)
        route.requests += 1
        try:
            x = route.check_input(x)
            self._user(options)
        except ClipperError:
            route.errors += 1
            raise
        qid = self._next_query_id
        self._next_query_id = qid + 1
        now = time.monotonic_ns()
        nbytes = _nbytes(x)
        why = self._refusal(route, queue, now, nbytes, route.answer_ns)
        if why is not None:
            self._refuse(conn, req_id, qid, route, why)
            return
        q = Query(conn, req_id, qid, route, x, nbytes, now, now + route.answer_ns)
        q.extra = PackedExtra(confidence=1.0, models=[queue.key])
        try:
            queue.submit(q)
        except ClipperError:
            route.errors += 1
            raise
        self.inflight_bytes += nbytes
        self.unsettled += 1
        route.track(q)

    def predict_array(self, conn, req_id: int, route: AppRoute, x) -> None:
        """:meth:`predict` of an input already known to be ``route``'s (its dtype and shape exactly,
        within max_input_bytes), with no options: the msgpack port's array fast path, whose input is a
        view of the frame's own bytes (``framing.array_input``), decoded by nobody."""
        if self.draining:
            raise ShuttingDownError("the frontend is shutting down and takes no new queries")
        route.requests += 1
        self._start(conn, req_id, route, x, None)

    def _start(self, conn, req_id: int, route: AppRoute, x, options) -> None:
        if not route.simple:
            return self._predict_selected(conn, req_id, route, x, self._user(options))
        if options is not None:
            self._user(options)  # validated, though the single-model policy keeps no state
        qid = self._next_query_id
        self._next_query_id = qid + 1
        queue = route.queue
        if queue is None:
            self._no_model(conn, req_id, qid, route)
            return
        # The hot path: this inlines _submit so that a cache hit allocates nothing (measured:
        # bench/micro/test_query_path_bench.py).
        cache = queue.cache
        token = None
        if cache is not None and route.use_cache:
            # The cache first, before anything is made for the query: a hit is answered right here.
            status, found = cache.lookup(queue.deployment_id, x, None)
            if status == self._HIT:
                route.cache_hits += 1
                route.answered += 1
                route.latency.count_fast()  # answered within this turn of the loop: the first bucket
                conn.send_result(req_id, qid, found, False, route.single_extra)
                return
            if status == self._PENDING:  # computing already: join it (admitted with its leader)
                now = time.monotonic_ns()
                nbytes = _nbytes(x)
                q = Query(conn, req_id, qid, route, x, nbytes, now, now + route.answer_ns)
                q.extra = route.single_extra
                self.inflight_bytes += nbytes
                self.unsettled += 1
                route.cache_joins += 1
                if found.followers is None:
                    found.followers = [q]
                else:
                    found.followers.append(q)
                route.track(q)
                return
            token = found  # a miss: this query will lead the reservation
        now = time.monotonic_ns()
        nbytes = x.nbytes if type(x) is np.ndarray else len(x)  # (_nbytes, inlined)
        # The msgpack fast path admitted this very request from its frame head: no second estimate.
        admitted = self._shed_route is route and self._shed_conn is conn and self._shed_id == req_id
        self._shed_route = self._shed_conn = None
        why = self._refusal(route, queue, now, nbytes, route.answer_ns, admitted)
        if why is not None:
            if token is not None:
                cache.fail(token)
            self._refuse(conn, req_id, qid, route, why)
            return
        # A busy loop read this request about its lag late, and will write the answer about as late:
        # the answer is planned that much earlier (and admission left that much less to the queue).
        q = Query(conn, req_id, qid, route, x, nbytes, now, now + route.answer_ns - min(2 * self.loop_lag_ns,
                                                                                        route.answer_ns // 2))
        q.extra = route.single_extra  # names the version it was sent to, even after a switch
        if token is not None:
            cache.set_leader(token, q)
            q.token = token
        try:
            queue.submit(q)
        except ClipperError:
            route.errors += 1  # QUEUE_FULL: a refused query is an outcome too
            if token is not None:
                q.token = None
                cache.fail(token)
            raise
        self.inflight_bytes += nbytes
        self.unsettled += 1
        route.deadlines.track(q)

    def admit_run(self, conn, route: AppRoute, items: list, start: int) -> int:
        """After the msgpack port's array fast path admitted a query of ``route`` from one read of
        ``conn``: take the PREDICT frames that follow it for the same application in one pass, as long
        as each would be admitted the same way one at a time (the last admission look's bound, the
        connection's pending limit, the queue's length and byte limits, the in-flight byte budget) and
        its input is an exact array (``framing.take_run``, native). Returns the index of the first
        frame left for the whole way. A pipelining client's read is mostly such a run: each query then
        costs its ticket and its place in the queue, not a trip through the per-frame path."""
        queue = route.queue
        if (queue is None or not route.simple or self.draining or (route.use_cache and queue.cache is not None)
                or route.ext_head is None or self.routes.get(route.name) is not route):
            return start
        room = min(conn.max_pending - conn.pending, queue.max_queue_length - queue.live)
        now = time.monotonic_ns()
        if self.admission:
            if not (queue.admit_version == queue.replica_version and now < queue.admit_until_ns
                    and route.answer_ns >= queue.admit_budget_ns):
                return start  # no standing bound: each is estimated on its own
            room = min(room, queue.admit_below - queue.live)
        if room <= 0:
            return start
        ids: list = []
        xs: list = []
        _take_run(items, start, route.name_bytes, route.ext_head, route.np_dtype, route.shape, conn.inflight, room,
                  ids, xs)
        answer_ns = route.answer_ns
        deadline = now + answer_ns - min(2 * self.loop_lag_ns, answer_ns // 2)  # (as _start plans it)
        extra = route.single_extra
        track = route.deadlines.track
        submit = queue.submit
        qid = self._next_query_id
        n = len(ids)
        for k in range(n):
            x = xs[k]
            nbytes = x.nbytes
            if (self.inflight_bytes + nbytes > self.max_inflight_bytes
                    or queue.bytes + nbytes > queue.max_queue_bytes):
                for rid in ids[k:]:  # the rest goes the whole way (and gets its error there)
                    conn.inflight.discard(rid)
                n = k
                break
            q = Query(conn, ids[k], qid, route, x, nbytes, now, deadline)
            q.extra = extra
            qid += 1
            submit(q)
            self.inflight_bytes += nbytes
            self.unsettled += 1
            track(q)
        self._next_query_id = qid
        route.requests += n
        conn.pending += n
        return start + n

    def _probe_lag(self) -> None:
        """Every 2 ms while requests arrive: how late the timer fired is how far behind the loop is."""
        now = self.loop.time()
        late = max(0.0, now - self._lag_due)
        self.loop_lag_ns = int(self.loop_lag_ns + 0.25 * (late * 1e9 - self.loop_lag_ns))
        seen = self._next_query_id
        if seen == self._lag_seen and not self.unsettled:  # idle: stop (an idle frontend uses no CPU)
            self._lag_timer = None
            self.loop_lag_ns = 0
            return
        self._lag_seen = seen
        self._lag_due = now + 0.002
        self._lag_timer = self.loop.call_at(self._lag_due, self._probe_lag)

    def _refusal(self, route: AppRoute, queue: ModelQueue, now: int, nbytes: int, budget_ns: int,
                 admitted: bool = False) -> str | None:
        """Why a query cannot be admitted to ``queue`` now (None: it can). ``admitted``: admission
        already admitted this request (:meth:`shed`); only the byte budget is left to check."""
        if self._lag_timer is None and self.admission:
            self._lag_due = self.loop.time() + 0.002
            self._lag_timer = self.loop.call_at(self._lag_due, self._probe_lag)
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            return (f"the frontend holds {self.inflight_bytes} bytes of inputs not yet answered; "
                    f"max_inflight_input_bytes is {self.max_inflight_bytes}")
        if not self.admission or admitted:
            return None
        if (queue.live < queue.admit_below and queue.admit_version == queue.replica_version
                and now < queue.admit_until_ns and budget_ns >= queue.admit_budget_ns):
            return None  # admitted by the last look's bound (see admits)
        kind, est = self.admits(queue, now, budget_ns)
        if kind == ADMIT:
            return None
        return overload_message(queue, route, kind, est)

    def admits(self, queue: ModelQueue, now: int, budget_ns: int) -> tuple[int, float]:
        """Admission's decision for a query arriving now at ``queue``: (``ADMIT`` or the ``REFUSE_*``
        reason, the estimate it was made from in ns).

        A query is admitted when its model can answer it in time *and* the
        work queued ahead of it is short: the estimated answer time (the
        queue's :meth:`~ModelQueue.estimate_ns`) within the budget (the
        application's planned answer time less twice the loop's lag: the
        request was read that late and its answer will be written that late),
        and, while the queue is overloaded (not empty for
        ``admission_standing_ms``, or it refused a query within that time),
        the wait before its batch at most ``admission_wait_batches`` batch
        latencies. A queue holding a couple of
        batches per replica keeps every replica busy, so the cap costs no
        throughput; what it saves under sustained overload is the queries a
        deeper queue would admit only to answer by default at their deadline,
        work spent for nothing exactly when the frontend has none to spare. A
        burst that fits its SLO and drains within the standing time is judged
        by the SLO alone (a client pipelining hundreds of queries at an idle
        model gets them all served).
        """
        if not queue.live and queue.free:
            # Nothing queued and a replica free: admitted, always. Besides costing nothing, it keeps
            # measuring: after a stall inflated the latency estimate, this is how it comes down again.
            return ADMIT, 0.0
        est = queue.estimate_ns(now)
        if est is None:
            return ADMIT, 0.0
        if est == _INF:
            queue.refused_at_ns = now
            queue.admit_until_ns = 0
            return REFUSE_STALLED, est
        limit: float = budget_ns - 2 * self.loop_lag_ns
        lat = queue.est_lat_ns
        if est > limit:
            if est - lat > self.admission_wait_batches * lat:  # (an app with a short SLO alone does not
                queue.refused_at_ns = now                       # make the queue overloaded for the others)
            queue.admit_until_ns = 0
            return REFUSE_SLO, est
        standing = self.admission_standing_ns
        since = queue.nonempty_since_ns if queue.live else now  # (an empty queue: non-empty with the next query)
        overloaded = (queue.live and now - since > standing) or now - queue.refused_at_ns < standing
        if overloaded and est - lat > self.admission_wait_batches * lat:
            # Overloaded: the queue has not emptied for a while, or it refused a moment ago. Capped too.
            queue.refused_at_ns = now
            queue.admit_until_ns = 0
            return REFUSE_QUEUE, est
        if overloaded or now + _ADMIT_HOLD_NS - since > standing:
            # The bound made below is capped when the queue is overloaded, or will count as such before the
            # bound expires.
            limit = min(limit, (self.admission_wait_batches + 1.0) * lat)
        # Admitted. The same look at the replicas admits any queue up to this length (a longer queue
        # only drains faster while it fills bigger batches): until a replica changes, or for
        # _ADMIT_HOLD_NS, a query need not be estimated at all while the queue stays shorter.
        rate = queue.est_rate
        room = limit - (est - queue.live / rate)
        queue.admit_below = int(room * rate)
        queue.admit_budget_ns = budget_ns  # (an application with a shorter budget is estimated for itself)
        queue.admit_version = queue.replica_version
        queue.admit_until_ns = now + _ADMIT_HOLD_NS
        queue.refusing_until_ns = 0  # a refusal's hold ends with the first admission after it
        return ADMIT, est

    def shed(self, route: AppRoute, req_id, frame_bytes: int, conn=None) -> bytes | None:
        """The refusal frame of a query admission would refuse, known from its application alone
        (None: it goes the whole way). For the msgpack port's fast path: nothing is decoded.

        A frame too big to hold a valid input goes the whole way too, so that
        a request that could never succeed gets its own error, not OVERLOADED.
        """
        queue = route.queue
        if (queue is None or not self.admission or not route.simple or self.draining
                or frame_bytes > route.max_valid_frame or (route.use_cache and queue.cache is not None)):
            return None  # (a cached application's query may be a hit, answered even under overload)
        if not queue.live and queue.free:
            return None
        now = time.monotonic_ns()
        if (queue.live < queue.admit_below and queue.admit_version == queue.replica_version
                and now < queue.admit_until_ns and route.answer_ns >= queue.admit_budget_ns):
            # admitted by the last look's bound (see admits)
            self._shed_route, self._shed_id, self._shed_conn = route, req_id, conn
            return None
        if now < queue.refusing_until_ns and (queue.refusing_kind != REFUSE_SLO
                                              or route.answer_ns <= queue.refusing_budget_ns):
            kind = queue.refusing_kind  # refused a moment ago: the estimate holds for a few hundred us
        else:
            kind, _ = self.admits(queue, now, route.answer_ns)
            if kind == ADMIT:
                # predict, on this frame, need not estimate again
                self._shed_route, self._shed_id, self._shed_conn = route, req_id, conn
                return None
            queue.refusing_until_ns = now + _REFUSAL_HOLD_NS
            queue.refusing_kind = kind
            queue.refusing_budget_ns = route.answer_ns
        route.requests += 1
        route.overloaded += 1
        qid = self._next_query_id
        self._next_query_id = qid + 1
        msg, extra, tail = route.overload_text(queue, kind)
        self.refusing_route = route  # the next reads may start with a run of its frames (shed_run)
        if route.default_on_overload:
            route.defaults += 1  # (its latency is counted by the port, which may hold the answer)
            return _result_frame(req_id, qid, route.packed_default, True, extra.packed)
        route.errors += 1
        return _error_frame(req_id, tail)

    def shed_run(self, route: AppRoute, items: list, start: int, out: bytearray, inflight=None,
                 max_out: int = -1) -> int:
        """After :meth:`shed` refused a frame: refuse the frames that follow it in ``items`` (one read
        of one connection) for the same application while the refusal holds, in one native pass, their
        answers appended to ``out``: OVERLOADED errors (``framing.refuse_run``), or the application's
        default output when its refusals are answered so (``framing.default_run``). Returns the
        index of the first frame left for the whole way (a frame whose id ``inflight`` holds is left
        too: the whole way refuses it as a duplicate; so is every frame once ``out`` holds ``max_out``
        bytes, so that the port writes what it has and heeds a client that stops reading before it
        answers more). Under overload most of a read is such a run, and a refusal costs a few hundred
        nanoseconds instead of a trip through Python per frame."""
        queue = route.queue
        now = time.monotonic_ns()
        if queue is None or now >= queue.refusing_until_ns or self.routes.get(route.name) is not route:
            # the hold is over (or the application was removed or replaced): reads stop trying runs
            # until shed refuses again
            if self.refusing_route is route:
                self.refusing_route = None
            return start
        if (self.draining or (not queue.live and queue.free)
                or (queue.refusing_kind == REFUSE_SLO and route.answer_ns > queue.refusing_budget_ns)):
            return start  # shed would admit (an idle model), or the hold was another app's SLO
        _, extra, tail = route.overload_text(queue, queue.refusing_kind)
        if route.default_on_overload:  # each answered at once with the default output, as shed answers one
            end = _default_run(items, start, route.name_bytes, route.max_valid_frame, self._next_query_id,
                               route.packed_default, extra.packed, out, inflight, max_out)
            route.defaults += end - start  # (their latency: counted by the port, as shed's)
        else:
            end = _refuse_run(items, start, route.name_bytes, route.max_valid_frame, tail, out, inflight, max_out)
            route.errors += end - start
        n = end - start
        route.requests += n
        route.overloaded += n
        self._next_query_id += n
        self.refused_in_runs += n
        return end

    def _refuse(self, conn, req_id, qid, route: AppRoute, why: str) -> None:
        """Answer a query admission refused: the default output at once, or OVERLOADED (raised)."""
        route.overloaded += 1
        if route.default_on_overload:
            route.defaults += 1
            route.latency.count_fast()
            conn.send_result(req_id, qid, route.default_output, True,
                             {"explanation": why, "confidence": 0.0, "models": []})
            return
        route.errors += 1
        raise OverloadedError(why)

    def _no_model(self, conn, req_id, qid, route: AppRoute) -> None:
        if route.error_on_deadline:
            raise NoModelAvailableError(f"application {route.name!r} has no linked model with a deployed version")
        route.defaults += 1
        conn.send_result(req_id, qid, route.default_output, True,
                         {"explanation": f"application {route.name!r} has no linked model with a deployed version",
                          "confidence": 0.0, "models": []})

    def _predict_selected(self, conn, req_id, route: AppRoute, x, user: str) -> None:
        now = time.monotonic_ns()
        qid = self._next_query_id
        self._next_query_id = qid + 1
        policy = route.policy
        if policy is None:
            return self._no_model(conn, req_id, qid, route)
        nbytes = _nbytes(x)
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            return self._refuse(conn, req_id, qid, route, (
                f"the frontend holds {self.inflight_bytes} bytes of inputs not yet answered; "
                f"max_inflight_input_bytes is {self.max_inflight_bytes}"))
        states = route.states
        state = None
        if states is not None:
            state = states.peek(user)
            if state is None:  # read from the store off the loop; the query goes on when it arrives
                self._wait_for_state(conn, req_id, route, nbytes, user, lambda st, known: self._select(
                    conn, req_id, qid, route, x, nbytes, now, user, st), now + route.answer_ns // 2)
                return
        self._select(conn, req_id, qid, route, x, nbytes, now, user, state)

    def _select(self, conn, req_id, qid, route: AppRoute, x, nbytes: int, now: int, user: str, state) -> None:
        # (route.policy: the caller checked it, not None)
        names = self._selection(route, route.policy.select(state, x), "select")  # type: ignore[union-attr]
        self._fan_out(Fanout(conn, req_id, qid, route, x, nbytes, now, now + route.answer_ns, user, state, names,
                             [_key(route, n) for n in names]), route.deadlines)

    def _wait_for_state(self, conn, req_id, route: AppRoute, nbytes: int, user: str, go, until_ns: int) -> None:
        """Hold a request until its user's policy state is read (``StateTable.fetch``), then ``go(state,
        known)``. Meanwhile it counts as unsettled (a drain waits for it) and its input against the
        in-flight budget; an error raised going on is its answer. It waits until ``until_ns`` at most (a
        share of its own deadline), or the table's load timeout: then it goes on with a fresh state that
        is not kept (``known`` False). A shutdown answers it with SHUTTING_DOWN."""
        self.inflight_bytes += nbytes
        self.unsettled += 1
        self.waiting_for_state += 1
        table = route.states
        assert table is not None  # (only a policy that learns has states to wait for)
        wait = _StateWait(self, conn, req_id, route, nbytes, go)
        self._state_waits.add(wait)
        delay = max(0.0, (until_ns - time.monotonic_ns()) / 1e9)
        wait.timer = self.loop.call_later(delay, wait.time_out, table)
        table.fetch(user, wait.resume)

    def _selection(self, route: AppRoute, names, what: str) -> list[str]:
        """Check what a policy's select (or feedback_models) returned."""
        try:
            names = list(names)
        except TypeError:
            names = None
        if names is None or any(n not in route.queue_by_name for n in names) or len(set(names)) != len(names):
            assert route.policy is not None  # (it was just asked)
            raise InternalError(f"policy {route.policy.name!r}: {what} returned {names!r}; expected distinct "
                                f"models among {list(route.queue_by_name)}")
        return names

    def _fan_out(self, f: Fanout, deadlines: Deadlines) -> None:
        route = f.route
        use_cache = route.use_cache
        self.inflight_bytes += f.nbytes
        self.unsettled += 1
        for i, name in enumerate(f.names):
            queue = route.queue_by_name[name]
            if queue is None:
                f.errors[i] = NoModelAvailableError(f"model {name!r} has no deployed version")
                f.remaining -= 1
                continue
            part = Part(f, i)
            f.parts.append(part)
            try:
                out = self._submit(route, queue, part, use_cache)
            except ClipperError as exc:  # that model's queue is full, or it cannot answer in time: this part only
                part.done = True
                f.errors[i] = exc
                f.remaining -= 1
                continue
            if out is not _QUEUED:
                part.done = True
                f.outputs[i] = out
                f.remaining -= 1
        if f.remaining <= 0:
            route.complete(f, at_deadline=False)
        else:
            deadlines.track(f)

    def _submit(self, route: AppRoute, queue: ModelQueue, part: Part, use_cache: bool):
        """Send ``part`` on its way to ``queue``: its output on a cache hit, else ``_QUEUED``.

        Through the cache: a hit answers now; a part whose input is being
        computed joins that computation; a miss is admitted (or refused with
        OverloadedError), reserves the entry and queues.
        """
        cache = queue.cache
        token = None
        if cache is not None and use_cache:
            status, found = cache.lookup(queue.deployment_id, part.input, part)
            if status == self._HIT:
                route.cache_hits += 1
                return found
            if status == self._PENDING:  # computing already: join it
                route.cache_joins += 1
                if found.followers is None:
                    found.followers = [part]
                else:
                    found.followers.append(part)
                return _QUEUED
            token = found
        why = self._refusal(route, queue, time.monotonic_ns(), 0, part.deadline_ns - part.arrival_ns)
        if why is not None:
            if token is not None:
                cache.fail(token)
            raise OverloadedError(why)
        part.token = token
        try:
            queue.submit(part)
        except ClipperError:
            if token is not None:
                part.token = None
                cache.fail(token)
            raise
        return _QUEUED

    def feedback(self, conn, req_id: int, app_name, x, label, options=None) -> None:
        """Learn from a label: the policy's observe on the predictions it needs; answers FEEDBACK_OK."""
        if self.draining:
            raise ShuttingDownError("the frontend is shutting down and takes no new feedback")
        route = self._route(app_name)
        x = route.check_input(x)
        route.check_label(label)
        user = self._user(options)
        route.feedback += 1
        policy = route.policy
        if policy is None:
            raise NoModelAvailableError(f"application {route.name!r} has no linked model with a deployed version")
        if not policy.learns:
            conn.send_feedback_ok(req_id, None)
            return
        nbytes = _nbytes(x)
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise OverloadedError(f"the frontend holds {self.inflight_bytes} bytes of inputs not yet answered; "
                                  f"max_inflight_input_bytes is {self.max_inflight_bytes}")
        state = route.states.peek(user)  # type: ignore[union-attr]  # a policy that learns has its states
        if state is None:  # read from the store off the loop; the feedback goes on when it arrives
            self._wait_for_state(conn, req_id, route, nbytes, user, lambda st, known: self._feedback_fan_out(
                conn, req_id, route, x, nbytes, user, label, st, known),
                time.monotonic_ns() + route.feedback_ns // 2)
            return
        self._feedback_fan_out(conn, req_id, route, x, nbytes, user, label, state, True)

    def _feedback_fan_out(self, conn, req_id, route: AppRoute, x, nbytes: int, user: str, label, state,
                          known: bool) -> None:
        if not known:  # learning from a fresh state would overwrite what the store holds for this user
            raise StateUnavailableError(f"the policy state of user {_short(user)} of application {route.name!r} "
                                        "could not be read from the state store in time; nothing was learned")
        policy: Policy = route.policy  # type: ignore[assignment]  # checked by feedback() and _StateWait.resume
        if not policy.learns or route.states is None:
            conn.send_feedback_ok(req_id, None)
            return
        names = self._selection(route, policy.feedback_models(state, x), "feedback_models")
        now = time.monotonic_ns()
        qid = self._next_query_id
        self._next_query_id = qid + 1
        self._fan_out(Fanout(conn, req_id, qid, route, x, nbytes, now, now + route.feedback_ns, user, state, names,
                             [_key(route, n) for n in names], label=label, is_feedback=True),
                      route.feedback_deadlines)

    # ------------------------------------------------------------ stopping
    async def drain(self, timeout_s: float) -> int:
        """Take no new request; wait up to ``timeout_s`` for every waiting one to be answered.

        Returns how many were still waiting at the end (then answered with
        SHUTTING_DOWN by :meth:`shut_down`).
        """
        self.draining = True
        if self.unsettled and timeout_s > 0:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                self._idle = None
        return self.shut_down(ShuttingDownError(
            f"the frontend is shutting down and could not answer within its {timeout_s:g} s drain"))

    def on_idle(self) -> None:
        if self._idle is not None:
            self._idle.set()

    def shut_down(self, exc: ClipperError) -> int:
        """Answer every request still waiting with ``exc`` (the end of a drain); returns how many."""
        n = 0
        for wait in list(self._state_waits):
            if wait.fail(exc):
                n += 1
        for route in self.routes.values():
            for dl in (route.deadlines, route.feedback_deadlines):
                for t in list(dl.items):
                    if t.settle(ERROR, exc):
                        n += 1
                dl.close()
                dl.items.clear()
        return n

    def stats(self) -> dict:
        return {
            "applications": {name: r.stats() for name, r in self.routes.items()},
            "models": {key: q.stats() for key, q in self.queues.items()},
            "cache": self.cache.stats() if self.cache is not None else None,
            "states": {"store": repr(self.store), "flushes": self.state_flushes, "flush_errors": self.state_flush_errors,
                       "waiting_for_state": self.waiting_for_state, "state_wait_timeouts": self.state_wait_timeouts,
                       **({"store_figures": self.store.stats()} if hasattr(self.store, "stats") else {})},
        }


def _nbytes(x) -> int:
    """The bytes an input holds (what the in-flight and queue budgets count)."""
    return x.nbytes if type(x) is np.ndarray else len(x)


def _msgpack_kind(type_byte: int) -> str:
    if 0xA0 <= type_byte <= 0xBF or 0xD9 <= type_byte <= 0xDB:
        return "str"
    if 0xC4 <= type_byte <= 0xC6:
        return "bytes"
    if type_byte == 0xC0:
        return "nil"
    if 0x80 <= type_byte <= 0x8F or type_byte in (0xDE, 0xDF):
        return "map"
    if type_byte in (0xCA, 0xCB):
        return "float"
    if 0xC7 <= type_byte <= 0xC9 or 0xD4 <= type_byte <= 0xD8:
        return "ndarray"
    return f"msgpack 0x{type_byte:02x}"


def _short(value) -> str:
    return brief(value)


def _key(route: AppRoute, name: str) -> str | None:
    q = route.queue_by_name.get(name)
    return q.key if q is not None else None
