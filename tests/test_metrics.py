"""The Prometheus endpoint: parsed by prometheus_client's own parser; its values move as queries flow."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipper.client import Client
from clipper.metrics import Histogram


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
