"""Metrics in the Prometheus text format, on their own port (default 1390).

Nothing is computed per scrape that the query path does not already count:
the routes, queues, replicas and the cache keep plain counters (and a few
fixed-bucket histograms, one list increment per observation). A scrape costs
the event loop a :func:`snapshot` of those figures (plain numbers and tuples,
copied, a slice of applications or models per loop turn); the text is rendered
from the snapshot in a worker thread (:func:`render_snapshot`; the exposition
is prometheus_client's). Concurrent scrapes share one rendering, and a
rendering is served again for ``limits.metrics_cache_ms``.
:class:`FrontendCollector` is the same families as a prometheus_client
collector, for callers that want them directly.

The port is on the frontend's one HTTP layer (:mod:`clipper.server.http`):
pipelined scrapes are answered in order under its flow control (a client that
does not read is paused, then closed), with at most ``max_metrics_connections``
connections.

Names follow the Prometheus conventions: ``clipper_<thing>_<unit>``,
counters end in ``_total``, times are in seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import time

import httptools

from .server.http import REASONS, HttpConnection, HttpReply, HttpServer, clip

log = logging.getLogger("clipper.metrics")

__all__ = ["Histogram", "LATENCY_BUCKETS_S", "BATCH_SIZE_BUCKETS", "FrontendCollector", "MetricsServer",
           "snapshot", "snapshot_steps", "render_snapshot"]

# Query latency: from the query's arrival to its answer.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 65536)


class Histogram:
    """Counts per bucket (upper bounds, inclusive) plus a sum: what a Prometheus histogram needs.

    ``observe_ns`` takes nanoseconds and keeps seconds; ``observe`` takes the
    value as it is. The ``+Inf`` bucket is the last count.
    """

    __slots__ = ("bounds", "_bounds_ns", "counts", "sum")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self._bounds_ns = [int(b * 1e9) for b in self.bounds]
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_ns(self, ns: int) -> None:
        self.counts[bisect.bisect_left(self._bounds_ns, ns)] += 1
        self.sum += ns / 1e9

    def count_fast(self, n: int = 1) -> None:
        """``n`` observations known to fall in the first bucket (answered in the turn they arrived: a cache
        hit, a refusal)."""
        self.counts[0] += n

    def count_at(self, ns: int, n: int = 1) -> None:
        """``n`` observations of ``ns`` nanoseconds each (0: :meth:`count_fast`)."""
        if ns <= 0:
            return self.count_fast(n)
        self.counts[bisect.bisect_left(self._bounds_ns, ns)] += n
        self.sum += n * ns / 1e9

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs as prometheus_client wants them."""
        return _cumulative(self.bounds, self.counts)

    def copy(self) -> tuple:
        """``(bounds, counts, sum)`` as they are now: what a snapshot keeps."""
        return self.bounds, tuple(self.counts), self.sum

    def quantile(self, q: float) -> float | None:
        """An estimate (the upper bound of the bucket holding quantile ``q``); None without samples."""
        total = self.count
        if not total:
            return None
        rank = q * total
        acc = 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            if acc >= rank:
                return b
        return float("inf")


def _fmt(b: float) -> str:
    return repr(float(b)) if not float(b).is_integer() else f"{float(b):.1f}"


def _cumulative(bounds, counts) -> list[tuple[str, int]]:
    out, acc = [], 0
    for b, c in zip(bounds, counts):
        acc += c
        out.append((_fmt(b), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


SNAPSHOT_SLICE = 256  # applications or models read per event-loop turn by an incremental snapshot


def snapshot(frontend) -> dict:
    """The frontend's figures as plain numbers and tuples, read on the event loop's thread.

    Everything a rendering needs, so that it can run on another thread without
    touching live objects. :func:`snapshot_steps` takes the same in slices.
    """
    steps = snapshot_steps(frontend)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def snapshot_steps(frontend, slice_len: int = SNAPSHOT_SLICE):
    """:func:`snapshot` as a generator: it yields after every ``slice_len`` applications or models
    (so a scrape of thousands of them never holds the event loop for long) and returns the snapshot.
    Figures read in different turns may be a few milliseconds apart; each one is exact."""
    fe = frontend
    proc = fe.processor
    routes = list(proc.routes.items())  # a copy: the registry may change between slices
    queues = list(proc.queues.items())
    apps = []
    for i, (name, r) in enumerate(routes, 1):
        apps.append((name, r.requests, r.answered, r.defaults, r.errors, r.cache_hits, r.partial, r.low_confidence,
                     r.feedback, r.latency.copy()))
        if i % slice_len == 0:
            yield
    proc_stats = fe.manager.stats() if fe.manager is not None else {}
    models = []
    for i, (key, q) in enumerate(queues, 1):
        models.append((key, q.queries_sent, q.batches_sent, q.queries_expired_in_queue, q.delayed_batches,
                       len(q.pending), len(q.replicas), q.wait_ns_total, _restarts(proc_stats.get(key)),
                       q.batch_sizes.copy(), q.batch_latency.copy(),
                       tuple((str(r.replica_id), r.sizer.current) for r in q.replicas)))
        if i % slice_len == 0:
            yield
    cache = proc.cache.stats() if proc.cache is not None else None
    servers = [(name, getattr(fe, attr, None)) for name, attr in
               (("msgpack", "query_server"), ("rest", "rest"), ("admin", "admin"), ("metrics", "metrics"))]
    connections = tuple((name, len(srv.connections) if srv is not None else 0) for name, srv in servers)
    closed = tuple((name, reason, n) for name, srv in servers if srv is not None
                   for reason, n in getattr(srv, "closed_by", {}).items())
    budget = getattr(fe, "partial_budget", None)
    return {"apps": apps, "models": models, "cache": cache, "connections": connections, "closed": closed,
            "partial_bytes": budget.used if budget is not None else 0}


def families(snap: dict):
    """The metric families of a :func:`snapshot` (any thread)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    apps: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
        "requests": CounterMetricFamily("clipper_app_requests", "Queries received, by application", labels=["app"]),
        "answers": CounterMetricFamily("clipper_app_answers", "Queries answered, by outcome: a model's answer, "
                                       "the default output, or an error", labels=["app", "outcome"]),
        "cache_hits": CounterMetricFamily("clipper_app_cache_hits", "Queries answered from the prediction cache",
                                          labels=["app"]),
        "partial": CounterMetricFamily("clipper_app_partial_answers", "Answers made without some selected model "
                                       "(stragglers left out at the deadline)", labels=["app"]),
        "low_conf": CounterMetricFamily("clipper_app_low_confidence", "Answers below the confidence threshold",
                                        labels=["app"]),
        "feedback": CounterMetricFamily("clipper_app_feedback", "Feedback requests", labels=["app"]),
        "default_ratio": GaugeMetricFamily("clipper_app_default_ratio", "Share of answered queries that got the "
                                           "default output, since start", labels=["app"]),
    }
    latency = HistogramMetricFamily("clipper_app_latency_seconds", "Query latency from arrival to answer",
                                    labels=["app"])
    for name, requests, answered, defaults, errors, hits, partial, low_conf, feedback, lat in snap["apps"]:
        apps["requests"].add_metric([name], requests)
        apps["answers"].add_metric([name, "model"], answered)
        apps["answers"].add_metric([name, "default"], defaults)
        apps["answers"].add_metric([name, "error"], errors)
        apps["cache_hits"].add_metric([name], hits)
        apps["partial"].add_metric([name], partial)
        apps["low_conf"].add_metric([name], low_conf)
        apps["feedback"].add_metric([name], feedback)
        done = answered + defaults
        apps["default_ratio"].add_metric([name], defaults / done if done else 0.0)
        latency.add_metric([name], _cumulative(lat[0], lat[1]), lat[2])
    yield from apps.values()
    yield latency

    models: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
        "queries": CounterMetricFamily("clipper_model_queries", "Queries sent to the model in batches",
                                       labels=["model"]),
        "batches": CounterMetricFamily("clipper_model_batches", "Batches sent to the model", labels=["model"]),
        "expired": CounterMetricFamily("clipper_model_expired_in_queue", "Queries dropped unsent at their deadline",
                                       labels=["model"]),
        "delayed": CounterMetricFamily("clipper_model_delayed_batches", "Batches held back by delayed batching",
                                       labels=["model"]),
        "queue": GaugeMetricFamily("clipper_model_queue_length", "Queries waiting in the model's queue",
                                   labels=["model"]),
        "replicas": GaugeMetricFamily("clipper_model_replicas", "Connected containers (replicas)",
                                      labels=["model"]),
        "wait": CounterMetricFamily("clipper_model_queue_wait_seconds", "Total time queries waited in the queue",
                                    labels=["model"]),
        "restarts": CounterMetricFamily("clipper_model_container_restarts", "Container processes restarted by "
                                        "the manager", labels=["model"]),
    }
    batch_size = HistogramMetricFamily("clipper_model_batch_size", "Queries per batch", labels=["model"])
    batch_latency = HistogramMetricFamily("clipper_model_batch_latency_seconds", "Time from a batch's send to "
                                          "its outputs", labels=["model"])
    max_batch = GaugeMetricFamily("clipper_replica_max_batch_size", "A replica's current batch size (AIMD, "
                                  "quantile or fixed)", labels=["model", "replica"])
    for (key, sent, batches, expired, delayed, queued, replicas, wait_ns, restarts, sizes, lats,
         sizers) in snap["models"]:
        models["queries"].add_metric([key], sent)
        models["batches"].add_metric([key], batches)
        models["expired"].add_metric([key], expired)
        models["delayed"].add_metric([key], delayed)
        models["queue"].add_metric([key], queued)
        models["replicas"].add_metric([key], replicas)
        models["wait"].add_metric([key], wait_ns / 1e9)
        models["restarts"].add_metric([key], restarts)
        batch_size.add_metric([key], _cumulative(sizes[0], sizes[1]), sizes[2])
        batch_latency.add_metric([key], _cumulative(lats[0], lats[1]), lats[2])
        for replica_id, current in sizers:
            max_batch.add_metric([key, replica_id], current)
    yield from models.values()
    yield batch_size
    yield batch_latency
    yield max_batch

    c = snap["cache"]
    if c is not None:
        for name, doc in (("lookups", "Cache lookups"), ("hits", "Lookups answered from the cache"),
                          ("misses", "Lookups that reserved an entry for a model to compute"),
                          ("joins", "Lookups that joined a computation in flight"),
                          ("evictions", "Entries evicted to stay within the byte budget"),
                          ("invalidations", "Entries dropped with their deployment")):
            yield CounterMetricFamily(f"clipper_cache_{name}", doc, value=c[name])
        yield GaugeMetricFamily("clipper_cache_entries", "Entries in the cache", value=c["entries"])
        yield GaugeMetricFamily("clipper_cache_bytes", "Bytes the cache charges against its budget",
                                value=c["used_bytes"])
        yield GaugeMetricFamily("clipper_cache_budget_bytes", "The cache's byte budget", value=c["budget_bytes"])
        yield GaugeMetricFamily("clipper_cache_hit_ratio", "Hits per lookup since start", value=c["hit_ratio"])
    g = GaugeMetricFamily("clipper_client_connections", "Open client connections", labels=["interface"])
    for name, n in snap["connections"]:
        g.add_metric([name], n)
    yield g
    closed = CounterMetricFamily("clipper_connections_closed", "Client connections the frontend closed, by "
                                 "reason (timeouts, limits, clients that do not read)",
                                 labels=["interface", "reason"])
    for name, reason, n in snap["closed"]:
        closed.add_metric([name, reason], n)
    yield closed
    yield GaugeMetricFamily("clipper_partial_frame_bytes", "Bytes held for unfinished frames and request bodies, "
                            "frontend-wide (max_partial_frame_bytes)", value=snap["partial_bytes"])


class _SnapshotCollector:
    def __init__(self, snap: dict) -> None:
        self.snap = snap

    def describe(self):
        return []

    def collect(self):
        return families(self.snap)


def render_snapshot(snap: dict) -> bytes:
    """The Prometheus text exposition of a :func:`snapshot` (runs on a worker thread)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)


class FrontendCollector:
    """A prometheus_client collector over one frontend's figures (collect on the event loop's thread)."""

    def __init__(self, frontend) -> None:
        self.fe = frontend

    def describe(self):
        return []

    def collect(self):
        return families(snapshot(self.fe))


def _restarts(proc_stat) -> int:
    if not proc_stat:
        return 0
    if isinstance(proc_stat, dict):
        return int(proc_stat.get("restarts", 0))
    return sum(int(p.get("restarts", 0)) for p in proc_stat if isinstance(p, dict))


_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer(HttpServer):
    """Serves ``GET /metrics`` (Prometheus text format) on the frontend's loop.

    A scrape takes a snapshot on the loop, in slices (:func:`snapshot_steps`),
    and renders it on a worker thread; scrapes that arrive meanwhile wait for
    that rendering. A rendering is served again for ``limits.metrics_cache_ms``,
    or for twice as long as it took to render if that is longer (the worker
    renders at most a third of the time, however often clients scrape); 0
    renders for every scrape. ``render_snapshot`` may be replaced (tests do).
    """

    interface = "metrics"
    max_connections_name = "max_metrics_connections"
    max_body_bytes = 64 * 1024  # scrapes carry no body

    def __init__(self, frontend) -> None:
        limits = frontend.config.limits
        super().__init__(asyncio.get_running_loop(), limits, max_connections=limits.max_metrics_connections,
                         partial_budget=getattr(frontend, "partial_budget", None))
        self.frontend = frontend
        self.cache_s = limits.metrics_cache_ms / 1000
        self.render_snapshot = render_snapshot
        self.renders = 0  # renderings made (the cache and coalescing keep this low)
        self._cached: bytes | None = None
        self._cached_at = 0.0  # monotonic time of the cached rendering's snapshot
        self._fresh_for = self.cache_s  # how long the cached rendering is served
        self._waiting: list = []  # (connection, reply, head_only) waiting for the rendering in progress
        self._rendering = False  # a snapshot or rendering is in progress
        self._future = None  # the worker's rendering, while it runs
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def render(self) -> bytes:
        """Snapshot and render here, now (on the loop's thread: for callers outside the port)."""
        return self.render_snapshot(snapshot(self.frontend))

    def scrape(self, conn: "_MetricsConnection", reply: HttpReply, head_only: bool) -> None:
        """Answer ``reply`` with the cached rendering if it is fresh, else with the next one."""
        if self._cached is not None and time.monotonic() - self._cached_at <= self._fresh_for:
            return conn.send_text(reply, 200, self._cached, head_only)
        self._waiting.append((conn, reply, head_only))
        if not self._rendering:
            self._rendering = True
            self._snapshot_step(snapshot_steps(self.frontend), time.monotonic())

    def _snapshot_step(self, steps, taken_at: float) -> None:
        """One slice of the snapshot per loop turn; then the rendering goes to the worker thread."""
        if self._closed:
            return self._answer_waiting(None, RuntimeError("the metrics server is closing"))
        try:
            next(steps)
        except StopIteration as done:
            return self._render(done.value, taken_at)
        except Exception as exc:  # a collector bug must not take the endpoint down silently
            log.exception("collecting metrics failed")
            return self._answer_waiting(None, exc)
        self.loop.call_soon(self._snapshot_step, steps, taken_at)

    def _render(self, snap: dict, taken_at: float) -> None:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipper-metrics")
        self.renders += 1
        started = time.monotonic()
        fut = self._future = self.loop.run_in_executor(self._executor, self.render_snapshot, snap)
        fut.add_done_callback(lambda f: self._rendered(f, taken_at, started))

    def _rendered(self, fut, taken_at: float, started: float) -> None:
        self._future = None
        if fut.cancelled():
            return self._answer_waiting(None, RuntimeError("the metrics server is closing"))
        exc = fut.exception()
        if exc is not None:
            log.error("rendering metrics failed", exc_info=exc)
            return self._answer_waiting(None, exc)
        body = fut.result()
        self._cached, self._cached_at = body, taken_at
        took = time.monotonic() - started
        self._fresh_for = 0.0 if self.cache_s == 0 else max(self.cache_s, 2 * took)
        self._answer_waiting(body, None)

    def _answer_waiting(self, body: bytes | None, exc) -> None:
        self._rendering = False
        waiting, self._waiting = self._waiting, []
        if body is None:
            body = f"collecting metrics failed: {type(exc).__name__}: {clip(str(exc), 200)}\n".encode()
        for conn, reply, head_only in waiting:
            conn.send_text(reply, 200 if exc is None else 500, body, head_only)

    async def close(self) -> None:
        self._closed = True
        await super().close()
        if self._future is not None:  # let the thread finish before the loop may go
            await asyncio.wait({self._future}, timeout=10)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class _MetricsConnection(HttpConnection):
    """One connection of the metrics port: ``GET /metrics`` (or ``/``), else 404."""

    def refusal(self, exc, status: int = 503) -> bytes:
        text = f"{exc.name}: {clip(exc.message, 1000)}\n".encode()
        return self._head(status, len(text), True) + text

    def on_request(self, body: list, keep_alive: bool) -> None:
        reply = self.new_reply(HttpReply(close=not keep_alive))
        head_only = self.parser.get_method() == b"HEAD"
        try:
            path = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            path = None
        if path not in (b"/metrics", b"/"):
            return self.send_text(reply, 404, b"not found: try /metrics\n", head_only)
        self.server.scrape(self, reply, head_only)

    def send_text(self, reply: HttpReply, status: int, body: bytes, head_only: bool = False) -> None:
        if self.closed:
            return
        head = self._head(status, len(body), reply.close)
        reply.data = head if head_only else (head, body)  # the body is shared by every reply of one rendering
        self.reply_ready(reply)

    @staticmethod
    def _head(status: int, length: int, close: bool) -> bytes:
        return (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {_TEXT}\r\n"
                f"Content-Length: {length}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}"
                f"\r\n").encode("latin-1")


MetricsServer.connection_class = _MetricsConnection
