"""Metrics in the Prometheus text format, on their own port (default 1390).

Nothing is computed per scrape that the query path does not already count:
the routes, queues, replicas and the cache keep plain counters (and a few
fixed-bucket histograms, one list increment per observation), and
:class:`FrontendCollector` turns them into metric families when Prometheus
(or ``clipper status``) asks. The exposition itself is prometheus_client's.

Names follow the Prometheus conventions: ``clipper_<thing>_<unit>``,
counters end in ``_total``, times are in seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import logging

log = logging.getLogger("clipper.metrics")

__all__ = ["Histogram", "LATENCY_BUCKETS_S", "BATCH_SIZE_BUCKETS", "FrontendCollector", "MetricsServer"]

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

    def count_fast(self) -> None:
        """One observation known to fall in the first bucket (a cache hit answered in the same turn)."""
        self.counts[0] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs as prometheus_client wants them."""
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append((_fmt(b), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out

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


class FrontendCollector:
    """A prometheus_client collector over one frontend's figures (read on the event loop's thread)."""

    def __init__(self, frontend) -> None:
        self.fe = frontend

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        fe = self.fe
        proc = fe.processor
        apps = {
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
        for name, r in proc.routes.items():
            apps["requests"].add_metric([name], r.requests)
            apps["answers"].add_metric([name, "model"], r.answered)
            apps["answers"].add_metric([name, "default"], r.defaults)
            apps["answers"].add_metric([name, "error"], r.errors)
            apps["cache_hits"].add_metric([name], r.cache_hits)
            apps["partial"].add_metric([name], r.partial)
            apps["low_conf"].add_metric([name], r.low_confidence)
            apps["feedback"].add_metric([name], r.feedback)
            done = r.answered + r.defaults
            apps["default_ratio"].add_metric([name], r.defaults / done if done else 0.0)
            h = r.latency
            latency.add_metric([name], h.buckets(), h.sum)
        yield from apps.values()
        yield latency

        models = {
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
        proc_stats = fe.manager.stats() if fe.manager is not None else {}
        for key, q in proc.queues.items():
            models["queries"].add_metric([key], q.queries_sent)
            models["batches"].add_metric([key], q.batches_sent)
            models["expired"].add_metric([key], q.queries_expired_in_queue)
            models["delayed"].add_metric([key], q.delayed_batches)
            models["queue"].add_metric([key], len(q.pending))
            models["replicas"].add_metric([key], len(q.replicas))
            models["wait"].add_metric([key], q.wait_ns_total / 1e9)
            models["restarts"].add_metric([key], _restarts(proc_stats.get(key)))
            batch_size.add_metric([key], q.batch_sizes.buckets(), q.batch_sizes.sum)
            batch_latency.add_metric([key], q.batch_latency.buckets(), q.batch_latency.sum)
            for r in q.replicas:
                max_batch.add_metric([key, str(r.replica_id)], r.sizer.current)
        yield from models.values()
        yield batch_size
        yield batch_latency
        yield max_batch

        cache = proc.cache
        if cache is not None:
            c = cache.stats()
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
        conns = len(fe.query_server.connections) if fe.query_server else 0
        rest = len(fe.rest.connections) if getattr(fe, "rest", None) else 0
        g = GaugeMetricFamily("clipper_client_connections", "Open client connections", labels=["interface"])
        g.add_metric(["msgpack"], conns)
        g.add_metric(["rest"], rest)
        yield g


def _restarts(proc_stat) -> int:
    if not proc_stat:
        return 0
    if isinstance(proc_stat, dict):
        return int(proc_stat.get("restarts", 0))
    return sum(int(p.get("restarts", 0)) for p in proc_stat if isinstance(p, dict))


class MetricsServer:
    """Serves ``GET /metrics`` (Prometheus text format) on the frontend's loop.

    The collector runs on the loop, between queries, so it reads consistent
    figures without locks; the HTTP parsing is httptools'.
    """

    def __init__(self, frontend) -> None:
        from prometheus_client import CollectorRegistry

        self.frontend = frontend
        self.loop = asyncio.get_running_loop()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FrontendCollector(frontend))
        self._server = None

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def start(self, host: str, port: int) -> int:
        self._server = await self.loop.create_server(lambda: _MetricsConnection(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _MetricsConnection(asyncio.Protocol):
    def __init__(self, server: MetricsServer) -> None:
        import httptools

        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self._url = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b"bad request\n", close=True)

    def on_message_begin(self) -> None:
        self._url = b""

    def on_url(self, url: bytes) -> None:
        if len(self._url) + len(url) > 8192:  # a bounded request target: httptools stops, 400, close
            raise ValueError("the request target exceeds 8192 bytes")
        self._url += url

    def on_message_complete(self) -> None:
        import httptools

        keep = self.parser.should_keep_alive()
        path = httptools.parse_url(self._url).path
        if path not in (b"/metrics", b"/"):
            return self._write(404, b"not found: try /metrics\n", close=not keep)
        try:
            body = self.server.render()
        except Exception as exc:  # a collector bug must not take the endpoint down silently
            log.exception("collecting metrics failed")
            return self._write(500, f"collecting metrics failed: {type(exc).__name__}: {exc}\n".encode(),
                               close=not keep)
        self._write(200, body, close=not keep)

    def _write(self, status: int, body: bytes, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}[status]
        ctype = "text/plain; version=0.0.4; charset=utf-8"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
        self.transport.write(head.encode("latin-1") + body)
        if close:
            self.transport.close()
