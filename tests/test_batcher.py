"""Batch-size controllers, on both implementations (Cython ``_batcher`` and the ``batcher_py`` twin)."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

batcher_py = importlib.import_module("clipper._native.batcher_py")
batcher_native = importlib.import_module("clipper._native._batcher")
IMPLS = [batcher_py, batcher_native]
IMPL_IDS = ["python", "native"]

MS = 1_000_000
STAT_KEYS = {"mode", "current", "budget_ns", "observed", "increases", "decreases", "holds", "last_n",
             "last_latency_ns", "fit_a_ns", "fit_b_ns", "samples"}
Z99 = 2.3263478740408408  # the standard normal's 0.99 quantile


@pytest.fixture(params=IMPLS, ids=IMPL_IDS)
def impl(request):
    return request.param


def check_stats(s) -> dict:
    st_ = s.stats()
    assert set(st_) == STAT_KEYS
    assert st_["current"] == s.current
    assert st_["mode"] == s.mode
    assert st_["budget_ns"] == s.budget_ns
    assert st_["observed"] == st_["increases"] + st_["decreases"] + st_["holds"]
    assert 1 <= s.current
    fit = s.fit()
    assert (st_["fit_a_ns"], st_["fit_b_ns"]) == ((None, None) if fit is None else fit)
    return st_


def linear_model(rng, base_ns, per_query_ns, sigma_ns):
    """Latency of a batch of n: base + per_query * n + normal noise, never negative."""
    def latency(n: int) -> int:
        noise = rng.normal(0.0, sigma_ns) if sigma_ns else 0.0
        return max(0, int(base_ns + per_query_ns * n + noise))
    return latency


def run_full_load(s, latency, count: int) -> list[int]:
    """Every batch is full: the replica always has ``current`` queries waiting."""
    out = []
    for _ in range(count):
        n = s.current
        out.append(s.observe(n, latency(n)))
    return out


def pinball(a, b, ns, ls, q) -> float:
    r = np.asarray(ls, dtype=float) - (a + b * np.asarray(ns, dtype=float))
    return float(np.sum(np.where(r >= 0, q * r, (q - 1.0) * r)))


# -- construction, properties, stats -----------------------------------------------------


def test_defaults(impl):
    s = impl.BatchSizer(budget_ns=10 * MS)
    assert s.mode == "aimd" and s.current == 1 and s.budget_ns == 10 * MS and s.fit() is None
    st_ = check_stats(s)
    assert st_ == {"mode": "aimd", "current": 1, "budget_ns": 10 * MS, "observed": 0, "increases": 0,
                   "decreases": 0, "holds": 0, "last_n": 0, "last_latency_ns": 0, "fit_a_ns": None,
                   "fit_b_ns": None, "samples": 0}
    assert impl.MODES == ("fixed", "aimd", "quantile")


def test_read_only_properties(impl):
    s = impl.BatchSizer(budget_ns=10)
    with pytest.raises(AttributeError):
        s.current = 5
    with pytest.raises(AttributeError):
        s.mode = "fixed"


def test_budget_is_writable_and_validated(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=10)
    assert s.observe(10, 5 * MS) == 12  # under 0.9 * 10 ms
    s.budget_ns = 4 * MS
    assert s.budget_ns == 4 * MS and s.stats()["budget_ns"] == 4 * MS
    assert s.observe(12, 5 * MS) == 10  # now over budget
    for bad in (0, -5, 1 << 63):
        with pytest.raises(ValueError, match=r"budget_ns must be an integer in \[1, 2\*\*63 - 1\]"):
            s.budget_ns = bad
    with pytest.raises(TypeError):
        s.budget_ns = 1.5
    assert s.budget_ns == 4 * MS


def test_counters_and_last_batch(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=10)
    s.observe(10, 1 * MS)   # increase
    s.observe(3, 1 * MS)    # hold (not full)
    s.observe(12, 20 * MS)  # decrease
    st_ = check_stats(s)
    assert (st_["observed"], st_["increases"], st_["holds"], st_["decreases"]) == (3, 1, 1, 1)
    assert (st_["last_n"], st_["last_latency_ns"], st_["samples"]) == (12, 20 * MS, 0)


def test_observe_accepts_integer_like_values(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=4)
    assert s.observe(np.int64(4), np.int32(1000)) == 6
    assert s.observe(True, 0) == 6  # a bool is an int: a batch of one, not full


# -- fixed --------------------------------------------------------------------------------


def test_fixed_is_constant(impl):
    s = impl.BatchSizer("fixed", budget_ns=10 * MS, max_batch=64, initial=3)
    assert s.current == 64  # initial is ignored
    for n, lat in [(64, 1), (1, 100 * MS), (64, 10 * MS), (7, 0)]:
        assert s.observe(n, lat) == 64
    st_ = check_stats(s)
    assert (st_["holds"], st_["increases"], st_["decreases"]) == (4, 0, 0)
    s.reset(5)
    assert s.current == 64 and s.fit() is None


# -- AIMD ---------------------------------------------------------------------------------


def test_aimd_additive_increase_only_when_full(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=10)
    assert s.observe(10, 8 * MS) == 12   # full, under 0.9 of the budget: +2
    assert s.observe(12, 0) == 14
    assert s.observe(13, 1 * MS) == 14   # not full: says nothing about larger batches
    assert s.observe(20, 1 * MS) == 16   # more than the limit counts as full
    s2 = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=10, step=5)
    assert s2.observe(10, 1 * MS) == 15


def test_aimd_holds_near_the_budget(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=20)
    assert s.observe(20, 9 * MS) == 20        # exactly 0.9 of the budget: hold
    assert s.observe(20, 9 * MS - 1) == 22    # just under: grow
    assert s.observe(22, 9_500_000) == 22
    assert s.observe(22, 10 * MS) == 22       # exactly the budget is not over it
    s2 = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=20, hold_fraction=1.0)
    assert s2.observe(20, 9_999_999) == 22    # hold_fraction 1: grow right up to the budget
    assert s2.observe(22, 10 * MS) == 22


@pytest.mark.parametrize("before, after", [(20, 18), (10, 9), (9, 8), (2, 1), (1, 1), (1024, 921), (100, 90)])
def test_aimd_multiplicative_decrease(impl, before, after):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=before)
    assert s.observe(before, 10 * MS + 1) == after


def test_aimd_decrease_with_other_backoff(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, initial=20, backoff=0.5)
    assert [s.observe(1, 11 * MS) for _ in range(6)] == [10, 5, 2, 1, 1, 1]


def test_aimd_caps_at_max_batch_and_floors_at_one(impl):
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, max_batch=7, initial=4)
    assert [s.observe(s.current, 1) for _ in range(4)] == [6, 7, 7, 7]
    s = impl.BatchSizer("aimd", budget_ns=10 * MS, max_batch=7, initial=4, step=1 << 62)
    assert s.observe(4, 1) == 7
    s = impl.BatchSizer("aimd", budget_ns=1, initial=3)
    assert [s.observe(1, 1 << 62) for _ in range(4)] == [2, 1, 1, 1]


def test_aimd_converges_below_the_budget(impl):
    # latency = 1 ms + 0.1 ms * n, budget 10 ms: n = 90 is the largest size within the budget, and from
    # n = 80 on a batch takes at least 0.9 of it.
    s = impl.BatchSizer("aimd", budget_ns=10 * MS)
    seq = run_full_load(s, linear_model(None, MS, 100_000, 0), 400)
    assert seq[39] == 81  # 1, 3, ..., 79 all grow; 81 takes 9.1 ms: hold
    assert set(seq[40:]) == {81}
    assert 80 <= s.current <= 90


def test_aimd_stays_in_a_band_with_noise(impl):
    rng = np.random.default_rng(7)
    s = impl.BatchSizer("aimd", budget_ns=10 * MS)
    seq = run_full_load(s, linear_model(rng, MS, 100_000, 200_000), 2000)
    tail = seq[200:]
    assert 70 <= min(tail) and max(tail) <= 92
    assert 80 <= float(np.median(tail)) <= 90
    st_ = check_stats(s)
    assert st_["decreases"] > 0 and st_["increases"] > 0


# -- reset --------------------------------------------------------------------------------


def test_reset(impl):
    s = impl.BatchSizer("quantile", budget_ns=10 * MS, initial=3, min_samples=4, refit_every=4)
    for n in (3, 5, 7, 9, 11, 13):
        s.observe(n, MS + 100_000 * n)
    assert s.fit() is not None and s.stats()["samples"] == 6
    s.reset()
    assert s.current == 3 and s.fit() is None
    st_ = check_stats(s)
    assert st_["samples"] == 0 and st_["observed"] == 6  # counters are cumulative
    s.reset(initial=50)
    assert s.current == 50
    # after a reset the first fit again waits for min_samples
    for _ in range(3):
        s.observe(1, 1000)
    assert s.fit() is None
    with pytest.raises(ValueError, match=r"initial must be an integer in \[1, max_batch=1024\]; got 0"):
        s.reset(0)
    with pytest.raises(ValueError, match="initial must be"):
        s.reset(1025)


# -- validation ---------------------------------------------------------------------------

BAD_ARGS = [
    ({"mode": "lifo"}, r"mode must be one of 'fixed', 'aimd', 'quantile'; got 'lifo'"),
    ({"mode": None}, r"mode must be one of .*; got None"),
    ({"budget_ns": 0}, r"budget_ns must be an integer in \[1, 2\*\*63 - 1\] \(ns\); got 0"),
    ({"budget_ns": -1}, r"budget_ns must be .*; got -1"),
    ({"max_batch": 0}, r"max_batch must be an integer in \[1, 1048576\]; got 0"),
    ({"max_batch": (1 << 20) + 1}, r"max_batch must be .*; got 1048577"),
    ({"initial": 0}, r"initial must be an integer in \[1, max_batch=1024\]; got 0"),
    ({"initial": 9, "max_batch": 8}, r"initial must be an integer in \[1, max_batch=8\]; got 9"),
    ({"step": 0}, r"step must be an integer >= 1; got 0"),
    ({"backoff": 1.0}, r"backoff must be in \(0, 1\); got 1.0"),
    ({"backoff": 0}, r"backoff must be in \(0, 1\); got 0.0"),
    ({"backoff": float("nan")}, r"backoff must be in \(0, 1\); got nan"),
    ({"hold_fraction": 0.0}, r"hold_fraction must be in \(0, 1\]; got 0.0"),
    ({"hold_fraction": 1.5}, r"hold_fraction must be in \(0, 1\]; got 1.5"),
    ({"quantile": 1}, r"quantile must be in \(0, 1\); got 1.0"),
    ({"quantile": -0.5}, r"quantile must be in \(0, 1\); got -0.5"),
    ({"window": 1}, r"window must be an integer in \[2, 65536\]; got 1"),
    ({"window": 1 << 17}, r"window must be an integer in \[2, 65536\]; got 131072"),
    ({"refit_every": 0}, r"refit_every must be an integer >= 1; got 0"),
    ({"min_samples": 1}, r"min_samples must be an integer in \[2, window=512\]; got 1"),
    ({"min_samples": 9, "window": 8}, r"min_samples must be an integer in \[2, window=8\]; got 9"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGS, ids=[m.split(" ")[0] + "-" + str(i)
                                                             for i, (_, m) in enumerate(BAD_ARGS)])
def test_constructor_validation(impl, kwargs, message):
    args = {"budget_ns": 10 * MS, **kwargs}
    mode = args.pop("mode", "aimd")
    with pytest.raises(ValueError, match=message):
        impl.BatchSizer(mode, **args)


def test_constructor_type_errors(impl):
    with pytest.raises(TypeError):
        impl.BatchSizer("aimd", budget_ns=1.5)
    with pytest.raises(TypeError):
        impl.BatchSizer("aimd", budget_ns=10, max_batch="8")
    with pytest.raises(TypeError, match="backoff must be a real number"):
        impl.BatchSizer("aimd", budget_ns=10, backoff="0.5")
    with pytest.raises(TypeError):
        impl.BatchSizer(budget_ns=10, window=None)
    with pytest.raises(TypeError):
        impl.BatchSizer("aimd")  # budget_ns is required
    with pytest.raises(TypeError):
        impl.BatchSizer("aimd", 10)  # and keyword-only


@pytest.mark.parametrize("n, latency, message", [
    (0, 5, r"n must be an integer in \[1, 2\*\*63 - 1\] \(queries in the batch\); got 0"),
    (-3, 5, r"n must be .*; got -3"),
    (1 << 63, 5, r"n must be .*; got 9223372036854775808"),
    (1, -1, r"latency_ns must be an integer in \[0, 2\*\*63 - 1\] \(ns\); got -1"),
    (1, 1 << 64, r"latency_ns must be .*; got 18446744073709551616"),
])
def test_observe_validation(impl, n, latency, message):
    for mode in impl.MODES:
        s = impl.BatchSizer(mode, budget_ns=10 * MS)
        with pytest.raises(ValueError, match=message):
            s.observe(n, latency)
        assert s.stats()["observed"] == 0


def test_observe_type_errors(impl):
    s = impl.BatchSizer(budget_ns=10 * MS)
    with pytest.raises(TypeError):
        s.observe(2.0, 5)
    with pytest.raises(TypeError):
        s.observe(2, 5.0)
    with pytest.raises(TypeError):
        s.observe("2", 5)


# -- quantile regression ------------------------------------------------------------------


def quantile_sizer(impl, samples, q, **kw):
    """A sizer whose one fit is over exactly ``samples``."""
    s = impl.BatchSizer("quantile", budget_ns=kw.pop("budget_ns", 1 << 40), quantile=q, window=len(samples),
                        min_samples=len(samples), refit_every=1 << 40, **kw)
    for n, lat in samples:
        s.observe(int(n), int(lat))
    return s


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", range(8))
def test_fit_is_an_exact_quantile_regression(impl, q, seed):
    # The optimum of the pinball loss passes through two samples: compare with every such line.
    rng = np.random.default_rng(seed)
    count = int(rng.integers(3, 40))
    ns = rng.integers(1, 9, count)
    ls = 50_000 * ns + rng.integers(0, 100_000, count)
    if seed % 2:
        ls[::3] = ls[0]  # ties and collinear points
    s = quantile_sizer(impl, list(zip(ns, ls)), q, max_batch=64)
    if len(set(ns.tolist())) == 1:
        assert s.fit() is None
        return
    a, b = s.fit()
    best = min(pinball(ls[i] - (ls[j] - ls[i]) / (ns[j] - ns[i]) * ns[i], (ls[j] - ls[i]) / (ns[j] - ns[i]),
                       ns, ls, q)
               for i, j in itertools.permutations(range(count), 2) if ns[i] != ns[j])
    assert pinball(a, b, ns, ls, q) <= best * (1 + 1e-9) + 1e-6


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.sampled_from([0.1, 0.5, 0.75, 0.99]),
       samples=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 2_000)), min_size=2, max_size=24))
def test_fit_is_optimal_hypothesis(q, samples):
    ns = np.array([n for n, _ in samples])
    ls = np.array([lat for _, lat in samples])
    fits = [quantile_sizer(m, samples, q, max_batch=16).fit() for m in IMPLS]
    if len(set(ns.tolist())) == 1:
        assert fits == [None, None]
        return
    assert fits[0] == pytest.approx(fits[1], rel=1e-12, abs=1e-9)
    a, b = fits[0]
    best = min(pinball(ls[i] - (ls[j] - ls[i]) / (ns[j] - ns[i]) * ns[i], (ls[j] - ls[i]) / (ns[j] - ns[i]),
                       ns, ls, q)
               for i, j in itertools.permutations(range(len(samples)), 2) if ns[i] != ns[j])
    assert pinball(a, b, ns, ls, q) <= best * (1 + 1e-9) + 1e-6


def test_fit_recovers_the_p99_line(impl):
    # n uniform in 1..200, latency = 1 ms + 0.1 ms * n + N(0, 0.2 ms): the true P99 line is
    # (1 ms + 2.326 * 0.2 ms) + 0.1 ms * n.
    rng = np.random.default_rng(2024)
    s = impl.BatchSizer("quantile", budget_ns=1 << 40, max_batch=256)
    latency = linear_model(rng, MS, 100_000, 200_000)
    ns, ls = [], []
    for _ in range(16 + 32 * 16):  # the last fit is over exactly the last 512 samples
        n = int(rng.integers(1, 201))
        lat = latency(n)
        ns.append(n)
        ls.append(lat)
        s.observe(n, lat)
    a, b = s.fit()
    true_a, true_b = MS + Z99 * 200_000, 100_000
    assert b == pytest.approx(true_b, rel=0.03)
    for n in (20, 100, 180):
        assert abs(a + b * n - (true_a + true_b * n)) < 0.5 * 200_000
    # the quantile property: at most 1% of the window lies above the line, at least 1% on or above it
    ns_w, ls_w = np.array(ns[-512:]), np.array(ls[-512:])
    resid = ls_w - (a + b * ns_w)
    above = int(np.sum(resid > 1e-6))
    on_or_above = int(np.sum(resid > -1e-6))
    assert above <= 0.01 * 512 <= on_or_above
    assert s.stats()["samples"] == 512


def test_quantile_converges_to_the_largest_size_under_budget(impl):
    # P99 latency of size n: 1 ms + 0.465 ms + 0.1 ms * n <= 10 ms  =>  n <= 85
    rng = np.random.default_rng(11)
    s = impl.BatchSizer("quantile", budget_ns=10 * MS)
    seq = run_full_load(s, linear_model(rng, MS, 100_000, 200_000), 3000)
    tail = seq[300:]
    assert 83 <= float(np.median(tail)) <= 87
    assert min(tail) >= 70 and max(tail) <= 95
    a, b = s.fit()
    assert b > 0


def test_quantile_follows_a_slowdown(impl):
    rng = np.random.default_rng(5)
    s = impl.BatchSizer("quantile", budget_ns=10 * MS)
    run_full_load(s, linear_model(rng, MS, 100_000, 200_000), 1500)
    assert 75 <= s.current <= 90
    # the model becomes twice as slow: P99 of size n is 2 ms + 0.93 ms + 0.2 ms * n  =>  n <= 35
    seq = run_full_load(s, linear_model(rng, 2 * MS, 200_000, 400_000), 1500)
    assert seq[0] < 80  # the first slow batch is over budget: cut at once
    assert max(seq) <= 90  # no overshoot while the window still holds the fast samples
    tail = seq[300:]
    assert 32 <= float(np.median(tail)) <= 37
    assert min(tail) >= 25 and max(tail) <= 42


def test_quantile_explores_like_aimd_before_the_first_fit(impl):
    rng = np.random.default_rng(3)
    latency = linear_model(rng, MS, 100_000, 200_000)
    q = impl.BatchSizer("quantile", budget_ns=10 * MS)
    a = impl.BatchSizer("aimd", budget_ns=10 * MS)
    for _ in range(15):
        n = q.current
        assert n == a.current
        lat = latency(n)
        assert q.observe(n, lat) == a.observe(n, lat)
        assert q.fit() is None
    q.observe(q.current, latency(q.current))  # the 16th sample: the first fit
    assert q.fit() is not None


def test_quantile_growth_is_capped_per_refit(impl):
    # Flat latency: the fit has b = 0 (no size dependence), so only the exploration cap limits growth:
    # the top of the sizes in the window plus their range again, once per refit.
    s = impl.BatchSizer("quantile", budget_ns=10 * MS)
    seq = run_full_load(s, lambda n: 1000, 16 + 32 * 6)
    assert seq[:15] == list(range(3, 33, 2))      # AIMD before the first fit: sizes 1, 3, ..., 31
    assert s.fit() is not None
    at_refits = [seq[15 + 32 * i] for i in range(7)]
    assert at_refits == [61, 121, 241, 481, 961, 1024, 1024]  # 2 * 31 - 1, 2 * 61 - 1, ...
    for i in range(6):  # the size holds between refits
        assert set(seq[15 + 32 * i: 15 + 32 * (i + 1)]) == {at_refits[i]}
    assert s.fit()[1] == 0.0


def test_quantile_cap_uses_the_window_range(impl):
    # All sizes in 40..44: the slope is barely known, so the line is trusted only up to 44 + 4.
    s = impl.BatchSizer("quantile", budget_ns=10 * MS, initial=44, min_samples=20)
    for i in range(20):
        s.observe(40 + i % 5, 1 * MS)
    assert s.fit() == (1 * MS, 0.0)
    assert s.current == 48


def test_quantile_target_from_the_line(impl):
    # Exact linear samples: the fit is the line itself and the target its crossing with the budget.
    s = impl.BatchSizer("quantile", budget_ns=10 * MS, initial=40, min_samples=20, refit_every=1 << 30)
    for i in range(20):
        n = 10 + i % 10  # 4.5 .. 6.75 ms, smaller than the size: AIMD holds
        s.observe(n, 2 * MS + 250_000 * n)
    assert s.fit() == (2 * MS, 250_000.0)
    assert s.current == 32  # 2 ms + 0.25 ms * 32 = 10 ms exactly
    s.budget_ns = 10 * MS - 1
    assert s.current == 32  # a new budget applies at the next refit


def test_quantile_safety_decrease_between_refits(impl):
    s = impl.BatchSizer("quantile", budget_ns=10 * MS, initial=40, min_samples=20, refit_every=1000)
    for i in range(20):
        n = 10 + i % 10  # 4.5 .. 6.75 ms, smaller than the size: AIMD holds
        s.observe(n, 2 * MS + 250_000 * n)
    assert s.current == 32
    assert s.observe(32, 10 * MS) == 32       # at the budget: hold
    assert s.observe(5, 1) == 32              # fast: hold (only a refit raises the size)
    assert s.observe(32, 10 * MS + 1) == 28   # over the budget: cut at once, floor(32 * 0.9)
    assert s.observe(28, 30 * MS) == 25


def test_quantile_degenerate_window_falls_back_to_aimd(impl):
    # Every batch has 50 queries: no slope can be fitted, so every decision is the AIMD rule's.
    rng = np.random.default_rng(9)
    q = impl.BatchSizer("quantile", budget_ns=10 * MS, refit_every=8)
    a = impl.BatchSizer("aimd", budget_ns=10 * MS)
    for _ in range(300):
        lat = int(rng.integers(0, 12 * MS))
        assert q.observe(50, lat) == a.observe(50, lat)
        assert q.fit() is None
    sq, sa = q.stats(), a.stats()
    assert sq["samples"] == 300 and sq["fit_a_ns"] is None
    for key in ("current", "increases", "decreases", "holds"):
        assert sq[key] == sa[key]


def test_quantile_batches_larger_than_max_batch_count_as_max_batch(impl):
    s = impl.BatchSizer("quantile", budget_ns=10 * MS, max_batch=8, min_samples=4, refit_every=100)
    for n in (50, 60, 70, 80):  # all clipped to 8: a single size
        s.observe(n, MS)
    assert s.fit() is None


def test_quantile_huge_latencies_are_capped_for_the_fit(impl):
    s = impl.BatchSizer("quantile", budget_ns=(1 << 63) - 1, max_batch=1 << 20, min_samples=4,
                        refit_every=100)
    for n, lat in [(1, 0), ((1 << 20) - 1, (1 << 63) - 1), (2, 1 << 62), (1 << 19, 5)]:
        s.observe(n, lat)
    a, b = s.fit()
    assert 0 <= a + b * 2 <= (1 << 40) + 1
    assert 1 <= s.current <= 1 << 20


# -- both implementations take the same decisions --------------------------------------------

latencies = st.one_of(st.integers(0, 30_000), st.integers(0, 40).map(lambda v: v * 1000),
                      st.integers(0, (1 << 63) - 1))
sizes = st.one_of(st.integers(1, 80), st.sampled_from([1, 2, 3, 5, 8]))
observation = st.tuples(st.just("observe"), sizes, latencies)
operations = st.lists(
    st.one_of(observation, observation, observation, observation, observation, observation,
              st.tuples(st.just("budget"), st.integers(1, 40_000), st.just(0)),
              st.tuples(st.just("reset"), st.one_of(st.none(), st.integers(1, 64)), st.just(0))),
    min_size=1, max_size=250,
)


def generated_ops(seed: int, length: int, style: str, budget: int) -> list:
    """A long random run (hypothesis keeps its own lists short): many refits, ties, budget changes."""
    rng = np.random.default_rng(seed)
    ops = []
    for i in range(length):
        if style == "ties":
            n = int(rng.choice([2, 3, 5]))
        else:
            n = int(rng.integers(1, 100))
        if style == "extreme":
            lat = int(rng.choice([0, budget, budget + 1, (1 << 63) - 1, 1 << 41, int(rng.integers(0, 3 * budget))]))
        elif style == "uniform":
            lat = int(rng.integers(0, 3 * budget))
        else:  # linear in n with noise around the budget, rounded to 100 ns: collinear samples
            lat = max(0, int(budget * (0.2 + n / 80 + rng.normal(0, 0.1))) // 100 * 100)
        ops.append(("observe", n, lat))
        if rng.random() < 0.005:
            ops.append(("budget", int(rng.integers(1, 2 * budget)), 0))
        if rng.random() < 0.002:
            ops.append(("reset", None, 0))
    return ops


def fit_resets(ops: list, max_batch: int) -> list:
    """Resets to a size over max_batch (an error, tested elsewhere) become resets to the default."""
    return [("reset", None, 0) if op[0] == "reset" and op[1] is not None and op[1] > max_batch else op
            for op in ops]


def check_agree(mode, kw, ops):
    sizers = [m.BatchSizer(mode, **kw) for m in IMPLS]
    for op, x, y in ops:
        if op == "observe":
            results = [s.observe(x, y) for s in sizers]
            assert results[0] == results[1]
        elif op == "budget":
            for s in sizers:
                s.budget_ns = x
        else:
            for s in sizers:
                s.reset(x)
        assert sizers[0].current == sizers[1].current
        fits = [s.fit() for s in sizers]
        assert (fits[0] is None) == (fits[1] is None)
        if fits[0] is not None:
            assert fits[0] == pytest.approx(fits[1], rel=1e-12, abs=1e-9)
    stats = [check_stats(s) for s in sizers]
    for key in STAT_KEYS - {"fit_a_ns", "fit_b_ns"}:
        assert stats[0][key] == stats[1][key], key


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["fixed", "aimd"]), max_batch=st.integers(1, 200), initial=st.integers(1, 200),
       step=st.integers(1, 7), backoff=st.sampled_from([0.9, 0.5, 0.99, 0.1]),
       hold_fraction=st.sampled_from([0.9, 1.0, 0.5, 0.95]), budget=st.integers(1, 40_000), ops=operations,
       seed=st.integers(0, 2**32 - 1), length=st.integers(0, 300),
       style=st.sampled_from(["uniform", "linear", "ties", "extreme"]))
def test_implementations_agree_aimd_fixed(mode, max_batch, initial, step, backoff, hold_fraction, budget, ops, seed,
                                          length, style):
    kw = dict(budget_ns=budget, max_batch=max_batch, initial=min(initial, max_batch), step=step,
              backoff=backoff, hold_fraction=hold_fraction)
    check_agree(mode, kw, fit_resets(ops + generated_ops(seed, length, style, budget), max_batch))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_batch=st.integers(1, 200), initial=st.integers(1, 64), step=st.integers(1, 7),
       backoff=st.sampled_from([0.9, 0.5, 0.99, 0.1]), hold_fraction=st.sampled_from([0.9, 1.0, 0.5, 0.95]),
       q=st.sampled_from([0.99, 0.5, 0.9, 0.3, 0.75]), window=st.integers(2, 40), refit_every=st.integers(1, 12),
       min_samples=st.integers(2, 12), budget=st.integers(1, 40_000), ops=operations,
       seed=st.integers(0, 2**32 - 1), length=st.integers(0, 600),
       style=st.sampled_from(["uniform", "linear", "ties", "extreme"]))
def test_implementations_agree_quantile(max_batch, initial, step, backoff, hold_fraction, q, window, refit_every,
                                        min_samples, budget, ops, seed, length, style):
    kw = dict(budget_ns=budget, max_batch=max_batch, initial=min(initial, max_batch), step=step, backoff=backoff,
              hold_fraction=hold_fraction, quantile=q, window=window, refit_every=refit_every,
              min_samples=min(min_samples, window))
    check_agree("quantile", kw, fit_resets(ops + generated_ops(seed, length, style, budget), max_batch))


@pytest.mark.parametrize("seed", range(3))
def test_implementations_agree_on_long_simulations(seed):
    # Full window (512), many refits, noise, a slowdown and a speed-up, a budget change.
    rng = np.random.default_rng(seed)
    phases = [(MS, 100_000, 200_000, 10 * MS, 1500), (2 * MS, 200_000, 400_000, 10 * MS, 1500),
              (MS, 50_000, 100_000, 10 * MS, 1000), (MS, 50_000, 100_000, 6 * MS, 1000)]
    sizers = [m.BatchSizer("quantile", budget_ns=10 * MS) for m in IMPLS]
    for base, per_query, sigma, budget, count in phases:
        for s in sizers:
            s.budget_ns = budget
        for _ in range(count):
            n = sizers[0].current
            lat = max(0, int(base + per_query * n + rng.normal(0, sigma)))
            assert sizers[0].observe(n, lat) == sizers[1].observe(n, lat)
            fits = [s.fit() for s in sizers]
            assert fits[0] == fits[1] or fits[0] == pytest.approx(fits[1], rel=1e-12)
    assert {k: v for k, v in sizers[0].stats().items() if not k.startswith("fit")} == \
        {k: v for k, v in sizers[1].stats().items() if not k.startswith("fit")}
