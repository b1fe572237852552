"""Micro benchmarks of ``BatchSizer.observe``: the compiled ``_batcher`` against the ``batcher_py`` twin.

Run with::

    .venv/bin/python -m pytest bench/micro/test_batcher_bench.py -p no:cacheprovider \\
        --benchmark-enable --benchmark-only

Each benchmarked call feeds a fixed list of observations (batch sizes 1..128,
latency 1 ms + 50 us per query + noise, budget 10 ms) to one sizer, so one
round's time divided by ``observations`` (in ``extra_info``) is the cost of
one ``observe``. The sizer is warmed up first, so in quantile mode its window
is full (512 samples) and every refit fits all of them. ``quantile`` refits
every 32 observations (the default: the per-call cost includes its share of
a refit); ``quantile-refit`` refits on every call, i.e. it measures one
refit plus one observe.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

IMPLS = {
    "native": importlib.import_module("clipper._native._batcher"),
    "python": importlib.import_module("clipper._native.batcher_py"),
}
MS = 1_000_000

# case -> (mode, constructor arguments, observations per benchmarked call)
CASES = {
    "aimd": ("aimd", {}, 4096),
    "quantile": ("quantile", {}, 4096),
    "quantile-refit": ("quantile", {"refit_every": 1}, 64),
}


def workload(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ns = rng.integers(1, 129, count)
    lat = np.clip(1 * MS + 50_000 * ns + rng.normal(0.0, 100_000.0, count), 0, None).astype(np.int64)
    return list(zip(ns.tolist(), lat.tolist()))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_observe(benchmark, case, impl):
    mode, kwargs, count = CASES[case]
    sizer = IMPLS[impl].BatchSizer(mode, budget_ns=10 * MS, **kwargs)
    for n, lat in workload(1024, seed=1):  # warm up: a full window and a fit in force
        sizer.observe(n, lat)
    pairs = workload(count)
    observe = sizer.observe

    def run():
        for n, lat in pairs:
            observe(n, lat)

    benchmark.group = f"observe-{case}"
    benchmark.extra_info["observations"] = count
    benchmark(run)
    if mode == "quantile":
        assert sizer.fit() is not None and sizer.stats()["samples"] == 512
    assert 1 <= sizer.current <= 1024
