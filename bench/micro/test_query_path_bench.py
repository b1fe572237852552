"""Micro benchmark of the msgpack query path for cache hits, against the echo floor's.

Run with ``python -m pytest bench/micro/test_query_path_bench.py -p no:cacheprovider
--benchmark-enable --benchmark-only``. Each round feeds ``FRAMES`` pipelined
PREDICT frames (784 float32 inputs, all cache hits) to one connection's
``data_received``, with a transport that discards what is written: what the
frontend spends per query between the socket read and the socket write,
without the event loop and the kernel. Divide a round by ``FRAMES``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import uvloop

from bench.echo_server import EchoProtocol
from clipper._native import framing
from clipper.config import Limits
from clipper.management.registry import Application
from clipper.protocol import wire
from clipper.query.batching import ModelQueue
from clipper.query.processor import AppRoute, QueryProcessor
from clipper.server.query_server import QueryConnection, QueryServer

FRAMES = 1000


class NullTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)

    def get_extra_info(self, name):
        return None

    def set_write_buffer_limits(self, high=None) -> None:
        pass


@pytest.fixture(scope="module")
def frames() -> bytes:
    x = np.random.default_rng(0).random(784, dtype=np.float32)
    return b"".join(framing.pack_frame(wire.pack(wire.predict(i, "cheap", x))) for i in range(FRAMES)), x


def hit_processor(loop, key) -> tuple[QueryProcessor, AppRoute]:
    """A processor with application "cheap" on one model queue, whose cache holds ``key``."""
    lim = Limits()
    proc = QueryProcessor(loop, lim.max_input_bytes, lim.cache_bytes)
    route = AppRoute(Application("cheap", "float32", [784], slo_ms=20), proc)
    proc.routes["cheap"] = route
    queue = ModelQueue("m:1", loop, lambda r, b: None, deployment_id=1, max_queue_length=1000,
                       max_batch_retries=1, max_batch=8, cache=proc.cache)
    route.set_links([("m", queue)])
    _, token = proc.cache.lookup(1, key, None)
    proc.cache.fill(token, 3)
    return proc, route


@pytest.mark.parametrize("per_read", [FRAMES, 1], ids=["pipelined", "one-frame-per-read"])
def test_cache_hit_path(benchmark, frames, per_read):
    """``pipelined``: all ``FRAMES`` in one read. ``one-frame-per-read``: one frame per read and one
    write per read, what an open-loop client sending one query at a time costs; the difference per
    query is the per-read cost (``data_received``'s bookkeeping, the reply's flush)."""
    data, x = frames
    size = len(data) // FRAMES * per_read
    reads = [data[i:i + size] for i in range(0, len(data), size)]
    loop = uvloop.new_event_loop()
    try:
        proc, route = hit_processor(loop, x)
        conn = QueryConnection(QueryServer(loop, proc, Limits(), "bench"))
        conn.transport = NullTransport()

        def run():
            for chunk in reads:
                conn.data_received(chunk)
                conn._flush()

        benchmark.extra_info["frames_per_round"] = FRAMES
        benchmark(run)
        assert route.cache_hits >= FRAMES and conn.pending == 0 and conn.transport.written > 0
    finally:
        loop.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["array-fast-path", "decoded"])
def test_queued_path(benchmark, frames, fast_path):
    """``FRAMES`` pipelined queries that miss the cache (it is off): each admitted, its input taken from
    the frame (the array fast path; ``decoded``: the full msgpack decoder, as before it) and queued, the
    batches sent to a replica that answers at once. Per query: the whole frontend path between the read
    and the write of a query that reaches a model, without the RPC."""
    data, x = frames
    loop = uvloop.new_event_loop()
    try:
        lim = Limits()
        proc = QueryProcessor(loop, lim.max_input_bytes, 0)
        proc.admission = False  # every query admitted (the burst would be capped by admission's queue limit)
        # A minute's SLO: the burst is read in one call, and decoding 1000 frames in full (``decoded``) takes
        # longer than a 20 ms SLO on a slow or loaded machine: the queries read first expired before their
        # batches were answered, and the check below failed (the path measured is the same either way).
        route = AppRoute(Application("cheap", "float32", [784], slo_ms=60_000, cache=False), proc)
        proc.routes["cheap"] = route
        sent = []
        queue = ModelQueue("m:1", loop, lambda r, b: sent.append((r, b)), deployment_id=1, max_queue_length=2000,
                           max_batch_retries=1, max_batch=64, budget_ns=10_000_000)
        route.set_links([("m", queue)])
        if not fast_path:
            route.ext_head = None  # what the msgpack port compares inputs with: none, so all are decoded

        class Replica:
            replica_id, pid, dead, sizer, batch, batch2 = 1, None, False, None, None, None

        queue.add_replica(Replica())
        conn = QueryConnection(QueryServer(loop, proc, Limits(), "bench"))
        conn.transport = NullTransport()
        outputs = {}

        def turn():  # one turn of the loop: its ready callbacks (the queue's dispatch, the flush)
            loop.call_soon(loop.stop)
            loop.run_forever()

        def run():
            conn.data_received(data)
            turn()
            while sent:
                while sent:
                    replica, batch = sent.pop()
                    n = len(batch.queries)
                    out = outputs.get(n)
                    if out is None:
                        out = outputs[n] = [0.0] * n
                    queue.deliver(replica, batch, out)
                turn()

        benchmark.extra_info["frames_per_round"] = FRAMES
        benchmark(run)
        assert route.answered >= FRAMES and conn.pending == 0 and conn.transport.written > 0
    finally:
        loop.close()


def test_cache_hit_path_with_api_key(benchmark, frames):
    """The cache-hit path on a connection that authenticated with an API key (``require_api_keys``):
    the difference to ``test_cache_hit_path`` is the per-query grant check, one set lookup."""
    from clipper.security import ApiKeyRegistry
    from clipper.store.sqlite import SQLiteStore

    data, x = frames
    loop = uvloop.new_event_loop()
    try:
        proc, route = hit_processor(loop, x)
        keys = ApiKeyRegistry(SQLiteStore(":memory:"))
        _, secret = keys.create(["cheap"])
        conn = QueryConnection(QueryServer(loop, proc, Limits(), "bench", api_keys=keys))
        conn.transport = NullTransport()
        conn.data_received(framing.pack_frame(wire.pack(wire.hello(0, api_key=secret))))
        conn._flush()
        assert conn.grant is not None

        def run():
            conn.data_received(data)
            conn._flush()

        benchmark.extra_info["frames_per_round"] = FRAMES
        benchmark(run)
        assert route.cache_hits >= FRAMES and conn.pending == 0
    finally:
        loop.close()


def test_echo_floor_path(benchmark, frames):
    data, _ = frames
    proto = EchoProtocol(wire.make_unpacker(), itertools.count())
    proto.connection_made(NullTransport())
    benchmark.extra_info["frames_per_round"] = FRAMES
    benchmark(proto.data_received, data)
    assert proto._transport.written > 0


def test_rest_cache_hit_path(benchmark, frames):
    """The same, over REST: ``FRAMES`` pipelined HTTP requests with a JSON body of 784 numbers."""
    import json

    from clipper.server.rest import RestConnection, RestServer

    _, x = frames
    loop = uvloop.new_event_loop()
    try:
        values = [round(float(v), 6) for v in x]
        proc, route = hit_processor(loop, np.array(values, np.float32))
        body = json.dumps({"input": values}).encode()
        req = (b"POST /cheap/predict HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = req * (FRAMES // 10)
        conn = RestConnection(RestServer(loop, proc, Limits(), lambda: []))
        conn.connection_made(NullTransport())
        benchmark.extra_info["requests_per_round"] = FRAMES // 10
        benchmark(conn.data_received, data)
        assert route.cache_hits >= FRAMES // 10 and conn.transport.written > 0
    finally:
        loop.close()


def test_refusal_path(benchmark, frames):
    """A query admission refuses (its model's only replica is stalled): answered from the frame's head,
    its input never decoded. Compare with ``test_cache_hit_path``: under overload a refusal must cost
    much less than an answer, or shedding load frees no room for the queries that are admitted."""
    data, x = frames
    loop = uvloop.new_event_loop()
    try:
        lim = Limits()
        proc = QueryProcessor(loop, lim.max_input_bytes, 0)
        route = AppRoute(Application("cheap", "float32", [784], slo_ms=20, cache=False, on_overload="error"), proc)
        proc.routes["cheap"] = route
        queue = ModelQueue("m:1", loop, lambda r, b: None, deployment_id=1, max_queue_length=1000,
                           max_batch_retries=1, max_batch=8, budget_ns=10_000_000)
        route.set_links([("m", queue)])

        class Stalled:  # its batch has been out far longer than its usual latency: drains nothing
            replica_id, pid, dead, sizer, batch, batch2 = 1, None, False, None, None, None

        replica = Stalled()
        queue.add_replica(replica)
        queue.free.clear()
        replica.lat_ewma_ns = 1e6
        replica.batch = type("Batch", (), {"sent_ns": 0})()
        conn = QueryConnection(QueryServer(loop, proc, Limits(), "bench"))
        conn.transport = NullTransport()

        def run():
            conn.data_received(data)
            conn._flush()

        benchmark.extra_info["frames_per_round"] = FRAMES
        benchmark(run)
        assert route.overloaded >= FRAMES and conn.pending == 0 and conn.transport.written > 0
    finally:
        loop.close()
