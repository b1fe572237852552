"""Micro benchmarks of the prediction cache: the compiled module against its pure-Python twin.

Run with ``python -m pytest bench/micro -p no:cacheprovider --benchmark-enable --benchmark-only``.
Keys are MNIST-sized inputs: 784 float32 values (3136 bytes). The insert benchmarks time
``OPS`` operations per round (see ``extra_info["ops_per_round"]``); divide by it for one.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

IMPLS = {
    "native": importlib.import_module("clipper._native._cache"),
    "python": importlib.import_module("clipper._native.cache_py"),
}
HIT, MISS = 0, 2
OPS = 1000                            # operations per round in the insert benchmarks
KEY_FLOATS = 784
ENTRY_OVERHEAD = 96
ENTRY_BYTES = KEY_FLOATS * 4 + 16 + ENTRY_OVERHEAD   # key + a float output + overhead


@pytest.fixture(params=list(IMPLS), scope="module")
def impl(request):
    return IMPLS[request.param]


@pytest.fixture(scope="module")
def keys() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return list(rng.random((OPS, KEY_FLOATS), dtype=np.float32))   # C-contiguous row views


def filled_cache(impl, keys, deployment=1, budget=1 << 30):
    cache = impl.PredictionCache(budget, entry_overhead=ENTRY_OVERHEAD)
    for i, key in enumerate(keys):
        kind, token = cache.lookup(deployment, key, None)
        assert kind == MISS
        assert cache.fill(token, float(i))
    return cache


@pytest.mark.benchmark(group="cache lookup HIT, numpy key")
def test_hit_numpy(benchmark, impl, keys):
    cache = filled_cache(impl, keys)
    key = keys[OPS // 2].copy()
    assert benchmark(cache.lookup, 1, key, None) == (HIT, float(OPS // 2))


@pytest.mark.benchmark(group="cache lookup HIT, bytes key")
def test_hit_bytes(benchmark, impl, keys):
    cache = filled_cache(impl, keys)
    key = keys[OPS // 2].tobytes()
    assert benchmark(cache.lookup, 1, key, None) == (HIT, float(OPS // 2))


@pytest.mark.benchmark(group=f"cache MISS + fill, x{OPS} per round")
def test_miss_fill(benchmark, impl, keys):
    # A fresh cache per round: OPS reservations and fills, growing the table from empty.
    benchmark.extra_info["ops_per_round"] = OPS
    cache = benchmark(filled_cache, impl, keys)
    assert len(cache) == OPS


@pytest.mark.benchmark(group=f"cache MISS + fill into a full cache (one eviction each), x{OPS} per round")
def test_miss_fill_evicting(benchmark, impl, keys):
    # The budget holds exactly OPS entries; every round inserts OPS new ones under a new deployment
    # id, so each insert evicts one entry (the CLOCK hand clears bits and evicts).
    benchmark.extra_info["ops_per_round"] = OPS
    cache = filled_cache(impl, keys, deployment=0, budget=OPS * ENTRY_BYTES)
    deployment = iter(range(1, 1 << 62))

    def insert_round():
        d = next(deployment)
        for i, key in enumerate(keys):
            kind, token = cache.lookup(d, key, None)
            cache.fill(token, float(i))

    evictions = cache.stats()["evictions"]
    benchmark(insert_round)
    assert cache.stats()["evictions"] > evictions and cache.used_bytes <= cache.budget_bytes
    assert len(cache) == OPS
