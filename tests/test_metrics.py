"""The Prometheus endpoint: parsed by prometheus_client's own parser; its values move as queries flow."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipper.client import Client
from clipper.metrics import Histogram
from clipper.protocol import wire


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_parse_and_move_with_traffic(frontend_factory):
    frontend = frontend_factory(metrics_cache_ms=0)  # exact figures at each scrape (no cached rendering)
    frontend.deploy("sum", "row_sum")
    port = frontend.fe.metrics_port
    before = scrape(port)
    assert value(before, "clipper_app_requests_total", app="sum") == 0
    assert value(before, "clipper_model_replicas", model="sum-model:1") == 1
    xs = [np.full(4, i, np.float32) for i in range(20)]
    with Client("127.0.0.1", frontend.port) as c:
        c.predict_many("sum", xs)
        c.predict_many("sum", xs[:5])  # cache hits
    after = scrape(port)
    assert value(after, "clipper_app_requests_total", app="sum") == 25
    assert value(after, "clipper_app_answers_total", app="sum", outcome="model") == 25
    assert value(after, "clipper_app_cache_hits_total", app="sum") == 5
    assert value(after, "clipper_app_latency_seconds_count", app="sum") == 25
    assert value(after, "clipper_app_latency_seconds_bucket", app="sum", le="+Inf") == 25
    assert value(after, "clipper_model_queries_total", model="sum-model:1") == 20
    batches = value(after, "clipper_model_batches_total", model="sum-model:1")
    assert 1 <= batches <= 20
    assert value(after, "clipper_model_batch_size_count", model="sum-model:1") == batches
    assert value(after, "clipper_model_batch_size_sum", model="sum-model:1") == 20
    assert value(after, "clipper_cache_hits_total") == 5 and value(after, "clipper_cache_entries") == 20
    assert value(after, "clipper_app_default_ratio", app="sum") == 0.0
    assert value(after, "clipper_client_connections", interface="msgpack") >= 0
    # cumulative buckets never decrease
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "clipper_app_latency_seconds_bucket")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))


def test_metrics_endpoint_404_for_other_paths(frontend):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{frontend.fe.metrics_port}/other", timeout=10)
    assert exc.value.code == 404


def test_histogram_buckets_and_quantiles():
    h = Histogram((0.001, 0.01, 0.1))
    for ns in (500_000, 1_000_000, 5_000_000, 50_000_000, 2_000_000_000):
        h.observe_ns(ns)
    h.count_fast()
    assert h.counts == [3, 1, 1, 1] and h.count == 6
    assert h.buckets() == [("0.001", 3), ("0.01", 4), ("0.1", 5), ("+Inf", 6)]
    assert h.sum == pytest.approx(0.0005 + 0.001 + 0.005 + 0.05 + 2.0)
    assert h.quantile(0.5) == 0.001 and h.quantile(0.8) == 0.1 and h.quantile(1.0) == float("inf")
    assert Histogram((1,)).quantile(0.5) is None


def _batch_holding(mark_dir, x0: float, timeout: float = 60.0) -> None:
    """Wait until the ``model_zoo.gated`` container recorded a batch holding input x[0] == ``x0``."""
    deadline = time.monotonic() + timeout
    while not any(repr(x0) in p.read_text().split(",") for p in mark_dir.glob("*.batch")):
        assert time.monotonic() < deadline, f"no batch holding {x0} within {timeout} s"
        time.sleep(0.01)


def test_queue_length_queue_wait_batch_latency_and_evictions_move(frontend_factory, wire_conn, tmp_path):
    """One batch of one held at a gate for at least 0.3 s with five queries queued behind it: the queue
    length gauge shows 5 while it is held and 0 after; the queue wait total grows by at least 5 x 0.3 s
    and the batch latency histogram holds one batch above 0.25 s (lower bounds only: a loaded machine makes
    both longer, never shorter). Then 2 KiB of cache and 40 more distinct inputs: the evictions counter
    equals the cache's own count, at least 20.

    Mutations caught: the queue gauge from ``len(q.replicas)`` instead of ``len(q.pending)``; the wait
    rendered as ns / 1e6 instead of / 1e9 (over the upper bound: five times the time from the sends to the
    replies); batch latencies never observed; evictions rendered from another counter (``invalidations``)."""
    fe = frontend_factory(metrics_cache_ms=0, admission_control=False, cache_bytes=2048)
    fe.deploy("held", "gated", batching="fixed", max_batch=1, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    port, key = fe.fe.metrics_port, "held-model:1"
    c = wire_conn(fe.port)
    c.send(wire.predict(0, "held", np.array([1000.0, 1, 0, 0], np.float32)))  # held at gate-1
    _batch_holding(tmp_path, 1000.0)
    t_sent = time.monotonic()
    for i in range(1, 6):
        c.send(wire.predict(i, "held", np.array([float(i), 0, 0, 0], np.float32)))
    fe.wait_until(lambda s: s["models"][key]["queue_length"] == 5, what="five queries queued")
    m = scrape(port)
    assert value(m, "clipper_model_queue_length", model=key) == 5
    assert value(m, "clipper_model_queue_wait_seconds_total", model=key) < 0.25  # only the first was sent
    time.sleep(0.3)
    (tmp_path / "gate-1").touch()
    replies = c.recv(6)
    waited_at_most = time.monotonic() - t_sent  # each of the five waited at least 0.3 s, at most this long
    assert sorted(r[3] for r in replies) == [1.0, 2.0, 3.0, 4.0, 5.0, 1000.0]
    m = scrape(port)
    assert value(m, "clipper_model_queue_length", model=key) == 0
    wait = value(m, "clipper_model_queue_wait_seconds_total", model=key)
    assert 5 * 0.3 <= wait <= 5 * waited_at_most, (wait, waited_at_most)
    assert value(m, "clipper_model_batch_latency_seconds_count", model=key) == 6
    assert value(m, "clipper_model_batch_latency_seconds_sum", model=key) >= 0.3
    below = {float(dict(k[1])["le"]): v for k, v in m.items()
             if k[0] == "clipper_model_batch_latency_seconds_bucket" and dict(k[1])["model"] == key}
    assert max(v for le, v in below.items() if le <= 0.25) <= 5 and below[float("inf")] == 6
    assert value(m, "clipper_cache_evictions_total") == 0
    for i in range(40):  # one at a time: each answer is cached before the next input arrives
        c.send(wire.predict(100 + i, "held", np.array([100.0 + i, 0, 0, 0], np.float32)))
        assert c.recv(1)[0][3] == 100.0 + i
    m = scrape(port)
    evictions = fe.stats()["cache"]["evictions"]
    assert evictions >= 20 and value(m, "clipper_cache_evictions_total") == evictions


def test_partial_answers_and_the_default_ratio_move(frontend_factory, tmp_path):
    """An ensemble whose slow member is held at a gate: the answer at the deadline counts as partial (and
    as a model's answer). Unlinked, the application answers its default: one default of two answers makes
    ``clipper_app_default_ratio`` 0.5.

    Mutations caught: the partial counter rendered from ``low_confidence``; the default ratio rendered
    as answered / done."""
    fe = frontend_factory(metrics_cache_ms=0)
    gate = tmp_path / "gate"
    fe.deploy_ensemble("strag", [("fast", "constant", {"CLIPPER_TEST_CONST": "4"}),
                                 ("slow", "constant", {"CLIPPER_TEST_CONST": "9", "CLIPPER_TEST_GATE": str(gate)})],
                       slo_ms=1000, output_kind="label", default_output=-1, cache=False)
    port = fe.fe.metrics_port
    x = np.array([3, 0, 0, 0], np.float32)
    try:
        with Client("127.0.0.1", fe.port, timeout=30) as c:
            p = c.predict("strag", x)
            assert p.output == 4 and not p.is_default and p.missing and p.missing[0].startswith("slow:1"), p
            m = scrape(port)
            assert value(m, "clipper_app_partial_answers_total", app="strag") == 1
            assert value(m, "clipper_app_answers_total", app="strag", outcome="model") == 1
            assert value(m, "clipper_app_default_ratio", app="strag") == 0.0
            fe.call(fe.fe.unlink("strag", "slow"))
            fe.call(fe.fe.unlink("strag", "fast"))
            p = c.predict("strag", x)
            assert p.is_default and p.output == -1
            m = scrape(port)
            assert value(m, "clipper_app_default_ratio", app="strag") == 0.5
            c.predict("strag", x)
            m = scrape(port)
            assert value(m, "clipper_app_default_ratio", app="strag") == pytest.approx(2 / 3)
            assert value(m, "clipper_app_answers_total", app="strag", outcome="default") == 2
            assert value(m, "clipper_app_partial_answers_total", app="strag") == 1  # defaults are not partial
    finally:
        gate.touch()


def test_container_restarts_are_counted(frontend_factory):
    """A container killed (SIGKILL, through the pid the frontend's manager reports for its own child) is
    restarted by the manager: ``clipper_model_container_restarts_total`` goes 0 -> 1 and the replicas gauge
    comes back to 1.

    Mutations caught: ``_restarts`` returning 0 for the manager's per-replica list; the counter rendered
    as 0."""
    fe = frontend_factory(metrics_cache_ms=0)
    fe.deploy("rs", "row_sum")
    port, key = fe.fe.metrics_port, "rs-model:1"
    assert value(scrape(port), "clipper_model_container_restarts_total", model=key) == 0
    (pid,) = fe.replica_pids(key)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (fe.replica_pids(key) and pid not in fe.replica_pids(key)):  # another process took its place
        assert time.monotonic() < deadline, fe.replica_pids(key)
        time.sleep(0.05)
    fe.call(fe.fe.wait_ready("rs-model", "1", timeout_s=60))
    m = scrape(port)
    assert value(m, "clipper_model_container_restarts_total", model=key) == 1
    assert value(m, "clipper_model_replicas", model=key) == 1
    with Client("127.0.0.1", fe.port) as c:
        assert c.predict("rs", np.ones(4, np.float32)).output == 4.0
