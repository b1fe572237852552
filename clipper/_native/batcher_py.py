"""Pure-Python twin of ``clipper._native._batcher`` (same API, same decisions).

Loaded instead of the Cython module when ``CLIPPER_NO_EXTENSIONS=1``; the
tests feed both the same observations and require the same ``current`` after
every one, and the same fit. It is also the readable reference for the policy.

One :class:`BatchSizer` per model replica chooses the largest batch the
replica may take next, from the latency of the batches it has finished
(from sending a batch to having its results, in ns) against the model's
latency budget ``budget_ns``.

Modes
-----
``fixed``
    Always ``max_batch``.
``aimd`` (default)
    After a batch of ``n`` queries that took ``L`` ns, with ``c`` the current
    size: ``L > budget`` cuts to ``max(1, floor(c * backoff))``; ``L`` in
    ``[hold_fraction * budget, budget]`` holds; below that, ``c`` grows by
    ``step`` only if the batch was full (``n >= c``): a smaller batch says
    nothing about larger ones. Always within ``[1, max_batch]``.
``quantile``
    Fits the ``quantile`` (e.g. P99) of latency as a line in the batch size,
    ``L_q(n) = a + b * n``, over the last ``window`` batches, and runs the
    largest ``n`` in ``[1, max_batch]`` with ``a + b * n <= budget``. The fit
    is repeated every ``refit_every`` observations (the first as soon as
    ``min_samples`` are in). Before the first fit, and while the window holds
    one batch size only (no line can be fitted), every observation follows
    the AIMD rule. Between refits the size holds, except that a batch over
    budget cuts it at once exactly as AIMD does. A slope ``b <= 0`` means the
    latency does not grow with the batch: the target is ``max_batch``, unless
    the line is over budget at the current size, when the size holds (a
    window mixing slow recent batches of small sizes with older fast ones of
    large sizes fits such a falling line).

    Exploration: the line is trusted only a little beyond the batch sizes it
    was fitted on. A refit raises the size to at most
    ``max(2 * hi - lo, hi + step)``, where ``lo`` and ``hi`` are the smallest
    and largest sizes in the window: the top of the sizes seen plus their
    range again. (This is the "twice the largest size" rule, tightened: a
    window of sizes 76..86 has a nearly useless slope, and doubling 86 would
    send batches twice over the budget.) Each step up brings samples of the
    new sizes, so while the window spans small sizes the growth is about a
    doubling per refit. The cap never lowers the size by itself.

    Two guards against a stale window. A refit never raises the size to or
    past the smallest batch that went over budget since the previous refit.
    And when a refit interval saw at least 3 over-budget batches, and more
    than 3 times the share ``1 - q`` expected at the target, the model has
    changed (it got slower): the samples before that interval are dropped
    and the line is fitted to the recent ones only (AIMD again if they are
    fewer than ``min_samples``).

The quantile fit
----------------
Linear quantile regression minimises the check (pinball) loss
``sum_i rho_q(L_i - a - b * n_i)`` with ``rho_q(u) = q * u`` for ``u >= 0``
and ``(q - 1) * u`` below. This is a linear programme whose optimum is
attained by a line through two samples with different sizes, so the fit is
exact, not iterative-approximate. It descends from vertex to vertex
(Wesolowsky's direct descent for one regressor, generalised from the median
to any quantile):

* Rotating the line about a sample ``k`` changes only its slope ``s``. The
  loss is then ``sum_i w_i * rho_{t_i}(s_i - s)`` over the other sizes, with
  ``s_i`` the slope from ``k`` to sample ``i``, ``w_i = |n_i - n_k|`` and
  ``t_i = q`` for larger sizes, ``1 - q`` for smaller ones. It is minimal at a
  weighted quantile of the ``s_i``: the first ``s_i`` (ascending) at which
  the running weight reaches ``T = q * P + (1 - q) * M``, where ``P`` and
  ``M`` are the weights of the larger and the smaller sizes.
* Start from a sample (the one nearest the previous fit, else slot 0),
  rotate about it, then keep rotating about the samples that lie on the
  line, each rotation strictly lowering the loss, until no rotation about
  any sample on the line improves it. All edges of the piecewise-linear loss
  at the current line are such rotations, and the loss is convex, so the
  line found is a global minimum. Every rotation is an O(N log N) sort.

All of it is integer arithmetic on the samples: slopes are compared as exact
fractions, the sample on the line test is an exact cross product, and the
target size is an exact floor division. The only floating-point steps are
single operations (``q * (P - M)``, ``c * backoff``, ``hold_fraction *
budget``, the stale-window share) that IEEE-754 rounds the same way in C and
in Python, so both implementations take the same decisions. (This assumes
the C compiler does not fuse a multiply and an add, as x86-64 builds without
``-mfma`` never do; only the reported ``a`` has such a pair, and no decision
depends on it.) The reported ``(a, b)`` are doubles derived from the integer
line.

Limits
------
``max_batch <= MAX_BATCH_LIMIT`` and ``window <= MAX_WINDOW``. For the fit,
latencies above ``FIT_LATENCY_CAP_NS`` (about 18 minutes) count as that
cap, batch sizes above ``max_batch`` count as ``max_batch``, and a budget
above ``FIT_BUDGET_CAP_NS`` counts as that cap; these keep every product in
64 bits. A fit stops after ``MAX_ROTATIONS`` rotations (a guard; real fits
take a handful).
"""

from __future__ import annotations

import numbers
import operator

MODES = ("fixed", "aimd", "quantile")
MAX_BATCH_LIMIT = 1 << 20
MAX_WINDOW = 1 << 16
FIT_LATENCY_CAP_NS = 1 << 40
FIT_BUDGET_CAP_NS = 1 << 41
MAX_ROTATIONS = 256

_INT64_MAX = (1 << 63) - 1
_FIXED = 0
_AIMD = 1
_QUANTILE = 2


def _int_arg(name: str, value, lo: int, hi: int, rule: str) -> int:
    value = operator.index(value)  # TypeError for anything that is not an integer
    if value < lo or value > hi:
        raise ValueError(f"{name} must be {rule}; got {value}")
    return value


def _fraction_arg(name: str, value, closed_above: bool) -> float:
    rule = "in (0, 1]" if closed_above else "in (0, 1)"
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {rule}; got {value!r}")
    value = float(value)
    if not (0.0 < value < 1.0 or (closed_above and value == 1.0)):  # NaN fails both
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return value


def _check_mode(mode) -> int:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of 'fixed', 'aimd', 'quantile'; got {mode!r}")
    return MODES.index(mode)


def _check_budget(value) -> int:
    return _int_arg("budget_ns", value, 1, _INT64_MAX, "an integer in [1, 2**63 - 1] (ns)")


class BatchSizer:
    """The batch-size controller of one model replica (see the module docstring)."""

    __slots__ = ("_mode", "_budget", "_max_batch", "_initial", "_step", "_backoff", "_hold_fraction",
                 "_q", "_window", "_refit_every", "_min_samples", "_slope_scale", "_stale_rate",
                 "_current", "_ring_n", "_ring_l", "_count", "_head", "_interval", "_next_fit", "_min_n", "_over_n", "_over_count", "_line", "_fit",
                 "_observed", "_increases", "_decreases", "_holds", "_last_n", "_last_latency")

    def __init__(self, mode: str = "aimd", *, budget_ns: int, max_batch: int = 1024, initial: int = 1,
                 step: int = 2, backoff: float = 0.9, hold_fraction: float = 0.9, quantile: float = 0.99,
                 window: int = 512, refit_every: int = 32, min_samples: int = 16) -> None:
        self._mode = _check_mode(mode)
        self._budget = _check_budget(budget_ns)
        self._max_batch = _int_arg("max_batch", max_batch, 1, MAX_BATCH_LIMIT,
                                   f"an integer in [1, {MAX_BATCH_LIMIT}]")
        self._initial = _int_arg("initial", initial, 1, self._max_batch,
                                 f"an integer in [1, max_batch={self._max_batch}]")
        # Growth past max_batch is clipped anyway; clipping the step keeps the compiled module's sums in 64 bits.
        self._step = min(_int_arg("step", step, 1, _INT64_MAX, "an integer >= 1"), self._max_batch)
        self._backoff = _fraction_arg("backoff", backoff, False)
        self._hold_fraction = _fraction_arg("hold_fraction", hold_fraction, True)
        self._q = _fraction_arg("quantile", quantile, False)
        self._window = _int_arg("window", window, 2, MAX_WINDOW, f"an integer in [2, {MAX_WINDOW}]")
        self._refit_every = _int_arg("refit_every", refit_every, 1, _INT64_MAX, "an integer >= 1")
        self._min_samples = _int_arg("min_samples", min_samples, 2, self._window,
                                     f"an integer in [2, window={self._window}]")
        # Slopes p/d with 0 < d < max_batch sort exactly by floor(p * max_batch**2 / d): two different
        # such fractions differ by at least 1 / max_batch**2.
        self._slope_scale = self._max_batch * self._max_batch
        # A refit interval with more over-budget batches than 3x the expected (1 - q) share (and at
        # least 3) means the model changed: the older samples are dropped.
        self._stale_rate = 3.0 * (1.0 - self._q)
        size = self._window if self._mode == _QUANTILE else 0
        self._ring_n = [0] * size   # batch sizes, clipped to max_batch
        self._ring_l = [0] * size   # latencies in ns, clipped to FIT_LATENCY_CAP_NS
        self._observed = self._increases = self._decreases = self._holds = 0
        self._last_n = self._last_latency = 0
        self.reset()

    # ------------------------------------------------------------------ properties
    @property
    def current(self) -> int:
        return self._current

    @property
    def mode(self) -> str:
        return MODES[self._mode]

    @property
    def budget_ns(self) -> int:
        return self._budget

    @budget_ns.setter
    def budget_ns(self, value: int) -> None:
        self._budget = _check_budget(value)

    # ------------------------------------------------------------------ API
    def reset(self, initial: int | None = None) -> None:
        if initial is None:
            initial = self._initial
        else:
            initial = _int_arg("initial", initial, 1, self._max_batch,
                               f"an integer in [1, max_batch={self._max_batch}]")
        self._current = self._max_batch if self._mode == _FIXED else initial
        self._count = 0      # samples in the ring
        self._head = 0       # the slot the next sample goes to
        self._interval = 0   # samples recorded since the last refit (or the reset)
        self._next_fit = self._min_samples  # ... when the next refit runs
        self._over_n = self._max_batch + 1  # the smallest size over budget since the last refit
        self._over_count = 0                # batches over budget since the last refit
        self._min_n = 1                     # the smallest size in the window at the last fit
        self._line: tuple[int, int, int, int] | None = None    # the fitted line as integers (n0, l0, d, dl), d > 0
        self._fit: tuple[float, float] | None = None     # the fitted line as (a, b) in ns and ns per query

    def observe(self, n: int, latency_ns: int) -> int:
        n = _int_arg("n", n, 1, _INT64_MAX, "an integer in [1, 2**63 - 1] (queries in the batch)")
        latency_ns = _int_arg("latency_ns", latency_ns, 0, _INT64_MAX, "an integer in [0, 2**63 - 1] (ns)")
        self._observed += 1
        self._last_n = n
        self._last_latency = latency_ns
        old = self._current
        if self._mode == _AIMD:
            new = self._aimd(old, n, latency_ns)
        elif self._mode == _QUANTILE:
            new = self._quantile_step(old, n, latency_ns)
        else:
            new = old
        if new > old:
            self._increases += 1
        elif new < old:
            self._decreases += 1
        else:
            self._holds += 1
        self._current = new
        return new

    def fit(self) -> tuple[float, float] | None:
        return self._fit

    def stats(self) -> dict:
        fit = self._fit
        return {
            "mode": MODES[self._mode],
            "current": self._current,
            "budget_ns": self._budget,
            "observed": self._observed,
            "increases": self._increases,
            "decreases": self._decreases,
            "holds": self._holds,
            "last_n": self._last_n,
            "last_latency_ns": self._last_latency,
            "fit_a_ns": None if fit is None else fit[0],
            "fit_b_ns": None if fit is None else fit[1],
            "samples": self._count,
        }

    def __repr__(self) -> str:
        return f"<BatchSizer mode={MODES[self._mode]} current={self._current} budget_ns={self._budget}>"

    # ------------------------------------------------------------------ AIMD
    def _decrease(self, cur: int) -> int:
        new = int(cur * self._backoff)  # one rounding of the product, then floor (the product is > 0)
        return new if new > 1 else 1

    def _aimd(self, cur: int, n: int, latency: int) -> int:
        if latency > self._budget:
            return self._decrease(cur)
        if float(latency) >= self._hold_fraction * float(self._budget):
            return cur
        if n >= cur:  # the limit was binding: a larger batch may fit too
            return self._max_batch if self._step >= self._max_batch - cur else cur + self._step
        return cur

    # ------------------------------------------------------------------ quantile regression
    def _quantile_step(self, cur: int, n: int, latency: int) -> int:
        slot = self._head
        size = n if n < self._max_batch else self._max_batch
        self._ring_n[slot] = size
        self._ring_l[slot] = latency if latency < FIT_LATENCY_CAP_NS else FIT_LATENCY_CAP_NS
        self._head = slot + 1 if slot + 1 < self._window else 0
        if self._count < self._window:
            self._count += 1
        self._interval += 1
        if latency > self._budget:
            self._over_count += 1
            if size < self._over_n:
                self._over_n = size
        if self._interval >= self._next_fit:
            return self._refit(cur, n, latency)
        if self._line is None:  # no usable fit yet: explore like AIMD
            return self._aimd(cur, n, latency)
        if latency > self._budget:  # safety between refits
            return self._decrease(cur)
        return cur

    def _refit(self, cur: int, n: int, latency: int) -> int:
        over_n = self._over_n
        if self._line is not None and self._over_count >= 3 and self._over_count > self._stale_rate * self._interval:
            self._keep_recent(self._interval)
        self._interval = 0
        self._next_fit = self._refit_every
        self._over_n = self._max_batch + 1
        self._over_count = 0
        max_n = self._fit_line()
        line = self._line
        if line is None:  # one batch size only: no slope to fit
            self._fit = None
            return self._aimd(cur, n, latency)
        n0, l0, d, dl = line
        b = dl / d
        self._fit = (float(l0) - b * float(n0), b)
        max_batch = self._max_batch
        budget = self._budget if self._budget < FIT_BUDGET_CAP_NS else FIT_BUDGET_CAP_NS
        if dl <= 0:
            # No size dependence: grow, unless the line is over budget at the current size already.
            target = max_batch if dl * (cur - n0) <= (budget - l0) * d else cur
        else:
            # the largest n with l0 + dl * (n - n0) / d <= budget
            x = n0 + ((budget - l0) * d) // dl
            target = 1 if x < 1 else (max_batch if x > max_batch else x)
        if target > cur:
            # trust the line only a little past the sizes it was fitted on: up to the top of their range
            # plus the range again (at least one step)
            cap = 2 * max_n - self._min_n
            if cap < max_n + self._step:
                cap = max_n + self._step
            new = target if target < cap else cap
            if new >= over_n:  # never back up to a size that just went over budget
                new = over_n - 1
            if new < cur:
                new = cur
        else:
            new = target
        if latency > self._budget:
            dec = self._decrease(cur)
            if dec < new:
                new = dec
        return new

    def _keep_recent(self, k: int) -> None:
        """Drop all but the newest ``k`` samples; they move to slots 0..k-1, oldest first."""
        if k >= self._count:
            return
        start = self._head - k
        if start < 0:
            start += self._window
        ns = self._ring_n
        ls = self._ring_l
        keep = [start + i if start + i < self._window else start + i - self._window for i in range(k)]
        kept_n = [ns[i] for i in keep]
        kept_l = [ls[i] for i in keep]
        ns[:k] = kept_n
        ls[:k] = kept_l
        self._count = k
        self._head = k if k < self._window else 0

    def _fit_line(self) -> int:
        """Fit the window; set ``_line`` (None if degenerate) and return the largest size in the window."""
        ns = self._ring_n
        ls = self._ring_l
        count = self._count
        n_min = n_max = ns[0]
        for i in range(1, count):
            v = ns[i]
            if v < n_min:
                n_min = v
            elif v > n_max:
                n_max = v
        self._min_n = n_min
        if n_min == n_max or count < self._min_samples:
            self._line = None
            return n_max
        # Warm start: the sample nearest the previous line (exact cross products).
        pivot = 0
        if self._line is not None:
            n0, l0, d, dl = self._line
            best = abs((ls[0] - l0) * d - dl * (ns[0] - n0))
            for i in range(1, count):
                r = abs((ls[i] - l0) * d - dl * (ns[i] - n0))
                if r < best:
                    best = r
                    pivot = i
        other = self._rotate(pivot, 0, 0)
        rotations = 1
        while True:
            n0 = ns[pivot]
            l0 = ls[pivot]
            d = ns[other] - n0
            dl = ls[other] - l0
            if d < 0:
                d = -d
                dl = -dl
            # The samples on the line with a size of their own, other first; the pivot is optimal already.
            cands = [other]
            for i in range(count):
                if (ls[i] - l0) * d - dl * (ns[i] - n0) == 0:
                    cands.append(i)
            if len(cands) - 1 == count:  # every sample on the line: zero loss
                break
            moved = False
            checked = [n0]
            for k in cands:
                nk = ns[k]
                if nk in checked:
                    continue
                checked.append(nk)
                if rotations >= MAX_ROTATIONS:
                    break
                rotations += 1
                j = self._rotate(k, d, dl)
                if j >= 0:
                    pivot = k
                    other = j
                    moved = True
                    break
            if not moved:
                break
        n0 = ns[pivot]
        l0 = ls[pivot]
        d = ns[other] - n0
        dl = ls[other] - l0
        if d < 0:
            d = -d
            dl = -dl
        self._line = (n0, l0, d, dl)
        return n_max

    def _rotate(self, k: int, dc: int, dlc: int) -> int:
        """Best line through sample ``k``: the slot of its second sample, or -1 if the slope dlc/dc is optimal.

        ``dc == 0`` means there is no current slope to test.
        """
        ns = self._ring_n
        ls = self._ring_l
        nk = ns[k]
        lk = ls[k]
        scale = self._slope_scale
        items = []
        above = 0   # P: weight of the larger sizes (their pinball weight is q)
        below = 0   # M: weight of the smaller sizes (1 - q)
        w_lt = 0    # weight of the slopes below the current one
        w_le = 0    # ... at or below it
        for i in range(self._count):
            d = ns[i] - nk
            if d == 0:
                continue
            p = ls[i] - lk
            if d > 0:
                above += d
            else:
                d = -d
                p = -p
                below += d
            if dc > 0:
                c = p * dc - dlc * d  # the sign of p/d - dlc/dc
                if c <= 0:
                    w_le += d
                    if c < 0:
                        w_lt += d
            items.append(((p * scale) // d, i, d))
        # The loss falls while the weight of the slopes below s is under T = q*P + (1-q)*M; compare
        # W - M with q * (P - M) so that the only rounding is that one product.
        threshold = self._q * (above - below)
        if dc > 0 and w_lt - below <= threshold and w_le - below >= threshold:
            return -1  # the current slope is a minimum: no need to sort
        items.sort()  # by exact slope p/d, then by slot
        w = 0
        for _key, i, d in items:
            w += d
            if w - below >= threshold:
                return i
        return items[-1][1]  # not reached: the total weight P + M is at least T
