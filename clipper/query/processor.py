"""The query processor: from a validated request to an answer.

For each application an :class:`AppRoute` checks inputs against the
application's type, sends queries to the model queue of its linked model,
and holds the application's deadlines: a query still unanswered at
``arrival + slo_ms`` gets the default output (or a deadline error, per the
application), so no query ever waits forever. Deadlines are kept in arrival
order per application, so one timer per application suffices.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from ..errors import (
    ClipperError,
    DeadlineExceededError,
    DTypeMismatchError,
    InputTooLargeError,
    InvalidInputError,
    NoModelAvailableError,
    ShapeMismatchError,
    UnknownApplicationError,
)
from ..management.registry import Application
from .batching import ModelQueue, Query

__all__ = ["AppRoute", "QueryProcessor"]


class AppRoute:
    """One application on the query path."""

    def __init__(self, app: Application, processor: "QueryProcessor") -> None:
        self.processor = processor
        self.loop = processor.loop
        self.queue: ModelQueue | None = None
        self.deadlines: deque[Query] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.requests = 0
        self.answered = 0
        self.defaults = 0
        self.errors = 0
        self.cache_hits = 0
        self.cache_joins = 0
        self.configure(app)

    def configure(self, app: Application) -> None:
        self.app = app
        self.name = app.name
        self.np_dtype = app.np_dtype
        self.shape = tuple(app.input_shape)
        self.opaque = app.input_dtype if self.np_dtype is None else None
        self.slo_ns = int(app.slo_ms * 1_000_000)
        self.default_output = app.default_output
        self.error_on_deadline = app.on_deadline == "error"
        self.use_cache = bool(app.cache)
        self.max_input_bytes = self.processor.max_input_bytes

    # ------------------------------------------------------------ inputs
    def check_input(self, x):
        """Return ``x`` as the application's input type, or raise InvalidInputError."""
        dt = self.np_dtype
        if dt is not None:
            if type(x) is np.ndarray:
                if x.dtype != dt:
                    raise DTypeMismatchError(
                        f"input has dtype {x.dtype.name}; application {self.name!r} expects {dt.name}")
                if x.shape != self.shape:
                    raise ShapeMismatchError(
                        f"input has shape {list(x.shape)}; application {self.name!r} expects {list(self.shape)}")
                if x.nbytes > self.max_input_bytes:
                    raise InputTooLargeError(
                        f"input of {x.nbytes} bytes exceeds max_input_bytes={self.max_input_bytes}")
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
        if len(x) > self.max_input_bytes:
            raise InputTooLargeError(f"input of {len(x)} bytes exceeds max_input_bytes={self.max_input_bytes}")
        return x

    def _convert_list(self, x: list) -> np.ndarray:
        dt = self.np_dtype
        shape = self.shape
        if not shape or len(x) != shape[0]:
            raise ShapeMismatchError(
                f"list input has {len(x)} elements in its first dimension; application "
                f"{self.name!r} expects shape {list(shape)}")
        nbytes = dt.itemsize
        for d in shape:
            nbytes *= d
        if nbytes > self.max_input_bytes:
            raise InputTooLargeError(
                f"input of {nbytes} bytes (as {dt.name}) exceeds max_input_bytes={self.max_input_bytes}")
        try:
            arr = np.array(x)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInputError(f"list input is not a regular array of numbers: {exc}") from None
        if arr.shape != self.shape:
            raise ShapeMismatchError(
                f"input has shape {list(arr.shape)}; application {self.name!r} expects {list(self.shape)}")
        kind = arr.dtype.kind
        if kind not in "biuf" or (kind == "f" and dt.kind in "iub"):
            raise DTypeMismatchError(
                f"list input holds {arr.dtype.name} values; application {self.name!r} expects {dt.name}")
        if kind in "iu" and dt.kind in "iu":
            info = np.iinfo(dt)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise InvalidInputError(f"list input has values outside the range of {dt.name}")
        return np.ascontiguousarray(arr, dtype=dt)

    # ------------------------------------------------------------ outcomes
    def finish(self, q: Query, output) -> None:
        if q.done:
            return
        q.done = True
        self.answered += 1
        q.conn.send_result(q.req_id, q.query_id, output, False, None)

    def fail(self, q: Query, exc: ClipperError) -> None:
        if q.done:
            return
        q.done = True
        self.errors += 1
        q.conn.send_error(q.req_id, exc)

    def give_default(self, q: Query, explanation: str) -> None:
        if q.done:
            return
        q.done = True
        self.defaults += 1
        q.conn.send_result(q.req_id, q.query_id, self.default_output, True, {"explanation": explanation})

    def expire(self, q: Query) -> None:
        """The query's deadline passed without an answer."""
        if self.error_on_deadline:
            self.fail(q, DeadlineExceededError(
                f"no answer within the {self.slo_ns / 1e6:g} ms SLO of application {self.name!r}"))
        else:
            self.give_default(q, f"no answer within the {self.slo_ns / 1e6:g} ms SLO")

    # ------------------------------------------------------------ deadlines
    def track(self, q: Query) -> None:
        self.deadlines.append(q)
        if self._timer is None:
            self._arm(q.deadline_ns)

    def _arm(self, deadline_ns: int) -> None:
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        self._timer = self.loop.call_at(self.loop.time() + max(delay, 0.0), self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        now = time.monotonic_ns()
        dq = self.deadlines
        while dq:
            q = dq[0]
            if q.done:
                dq.popleft()
            elif q.deadline_ns <= now + 500_000:  # within the timer's resolution
                dq.popleft()
                self.expire(q)
            else:
                self._arm(q.deadline_ns)
                return

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "defaults": self.defaults,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "cache_joins": self.cache_joins,
            "model_queue": self.queue.key if self.queue else None,
        }


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
    """

    def __init__(self, loop, max_input_bytes: int, cache_bytes: int = 0) -> None:
        self.loop = loop
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

    def predict(self, conn, req_id: int, app_name, x) -> None:
        """Start answering one query; raises a ClipperError for a request that cannot start."""
        route = self.routes.get(app_name)
        if route is None:
            raise UnknownApplicationError(f"no application named {app_name!r} is registered")
        route.requests += 1
        x = route.check_input(x)
        now = time.monotonic_ns()
        qid = self._next_query_id
        self._next_query_id = qid + 1
        q = Query(conn, req_id, qid, route, x, now, now + route.slo_ns)
        queue = route.queue
        if queue is None:
            if route.error_on_deadline:
                raise NoModelAvailableError(f"application {app_name!r} has no linked model")
            q.done = True  # answered right here
            route.defaults += 1
            conn.send_result(req_id, qid, route.default_output, True,
                             {"explanation": f"application {app_name!r} has no linked model"})
            return
        cache = queue.cache
        if cache is not None and route.use_cache:
            status, found = cache.lookup(queue.deployment_id, x, q)
            if status == self._HIT:
                route.cache_hits += 1
                q.done = True
                route.answered += 1
                conn.send_result(req_id, qid, found, False, None)
                return
            if status == self._PENDING:  # computing already: join it
                route.cache_joins += 1
                if found.followers is None:
                    found.followers = [q]
                else:
                    found.followers.append(q)
                route.track(q)
                return
            q.token = found
            try:
                queue.submit(q)
            except ClipperError:
                q.token = None
                cache.fail(found)
                raise
        else:
            queue.submit(q)
        route.track(q)

    def stats(self) -> dict:
        return {
            "applications": {name: r.stats() for name, r in self.routes.items()},
            "models": {key: q.stats() for key, q in self.queues.items()},
            "cache": self.cache.stats() if self.cache is not None else None,
        }
