# cython: language_level=3
"""Per-replica batch-size controllers (native). See batcher_py.py for the twin.

A ``BatchSizer`` chooses the largest batch a model replica may take next, from
the measured latency of its finished batches against the model's latency
budget: ``fixed`` (always ``max_batch``), ``aimd`` (additive increase while
under ``hold_fraction`` of the budget and the batch was full, hold near the
budget, multiplicative decrease over it) or ``quantile`` (an exact linear
quantile regression of latency on batch size over a window of samples, with
AIMD before the first fit, a growth cap per refit and guards against a stale
window).
The twin's module docstring is the full description of the policy and of the
fit; this file follows it step by step so that both take the same decisions.

Everything a decision depends on is integer arithmetic or a single IEEE-754
operation (``q * (P - M)``, ``c * backoff``, ``hold_fraction * budget``,
``3 * (1 - q) * k`` as two roundings in a fixed order), which C and Python
round identically. Slopes are fractions ``p / d``: they
are sorted by the double ``p / d`` (monotone in the exact value, since the
division is correctly rounded) and, among equal doubles, by exact cross
products. All products stay below 2**62 thanks to the limits below.
"""

cimport cython
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int64_t
from libc.stdlib cimport qsort

import numbers
import operator

MODES = ("fixed", "aimd", "quantile")
MAX_BATCH_LIMIT = 1 << 20
MAX_WINDOW = 1 << 16
FIT_LATENCY_CAP_NS = 1 << 40
FIT_BUDGET_CAP_NS = 1 << 41
MAX_ROTATIONS = 256

cdef enum:
    C_MAX_ROTATIONS = 256               # guard on the rotations of one fit

# 64-bit constants (a cdef enum is a C int)
cdef int64_t C_FIT_LATENCY_CAP_NS = 1LL << 40   # latencies above count as this in the fit
cdef int64_t C_FIT_BUDGET_CAP_NS = 1LL << 41    # a budget above counts as this for the fitted target

cdef int64_t _INT64_MAX = 0x7FFFFFFFFFFFFFFF

cdef str _N_RULE = "an integer in [1, 2**63 - 1] (queries in the batch)"
cdef str _LATENCY_RULE = "an integer in [0, 2**63 - 1] (ns)"
cdef str _BUDGET_RULE = "an integer in [1, 2**63 - 1] (ns)"


def _int_arg(name, value, lo, hi, rule):
    value = operator.index(value)  # TypeError for anything that is not an integer
    if value < lo or value > hi:
        raise ValueError(f"{name} must be {rule}; got {value}")
    return value


def _fraction_arg(name, value, closed_above):
    rule = "in (0, 1]" if closed_above else "in (0, 1)"
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {rule}; got {value!r}")
    value = float(value)
    if not (0.0 < value < 1.0 or (closed_above and value == 1.0)):  # NaN fails both
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return value


cdef int64_t _as_int64(object value, str name, int64_t lo, str rule) except? -1:
    """``value`` as an int64 >= ``lo``: the hot-path twin of ``_int_arg`` (same errors)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)  # TypeError for non-integers
    if overflow != 0 or v < lo:
        raise ValueError(f"{name} must be {rule}; got {PyNumber_Index(value)}")
    return v


@cython.cdivision(True)
cdef inline int64_t _floor_div(int64_t a, int64_t b) noexcept:
    # b > 0; C division truncates towards zero, the fit needs the floor.
    cdef int64_t q = a / b
    if a % b != 0 and a < 0:
        q -= 1
    return q


cdef inline int64_t _abs64(int64_t x) noexcept:
    return -x if x < 0 else x


cdef int _cmp_items(const void* pa, const void* pb) noexcept nogil:
    cdef const SlopeItem* a = <const SlopeItem*>pa
    cdef const SlopeItem* b = <const SlopeItem*>pb
    cdef int64_t x, y
    if a.key < b.key:
        return -1
    if a.key > b.key:
        return 1
    x = a.p * b.d      # equal doubles: compare p_a / d_a with p_b / d_b exactly
    y = b.p * a.d
    if x < y:
        return -1
    if x > y:
        return 1
    if a.slot < b.slot:
        return -1
    return 1 if a.slot > b.slot else 0


@cython.final
cdef class BatchSizer:
    """The batch-size controller of one model replica (see ``batcher_py`` for the policy)."""

    def __cinit__(self):
        self._ring_n = NULL
        self._ring_l = NULL
        self._items = NULL
        self._cands = NULL

    def __init__(self, mode="aimd", *, budget_ns, max_batch=1024, initial=1, step=2, backoff=0.9,
                 hold_fraction=0.9, quantile=0.99, window=512, refit_every=32, min_samples=16):
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of 'fixed', 'aimd', 'quantile'; got {mode!r}")
        self._mode = <Mode><int>MODES.index(mode)
        self._budget = _int_arg("budget_ns", budget_ns, 1, _INT64_MAX, _BUDGET_RULE)
        self._max_batch = _int_arg("max_batch", max_batch, 1, MAX_BATCH_LIMIT,
                                   f"an integer in [1, {MAX_BATCH_LIMIT}]")
        self._initial = _int_arg("initial", initial, 1, self._max_batch,
                                 f"an integer in [1, max_batch={self._max_batch}]")
        self._step = min(_int_arg("step", step, 1, _INT64_MAX, "an integer >= 1"), self._max_batch)
        self._backoff = _fraction_arg("backoff", backoff, False)
        self._hold_fraction = _fraction_arg("hold_fraction", hold_fraction, True)
        self._q = _fraction_arg("quantile", quantile, False)
        self._window = _int_arg("window", window, 2, MAX_WINDOW, f"an integer in [2, {MAX_WINDOW}]")
        self._refit_every = _int_arg("refit_every", refit_every, 1, _INT64_MAX, "an integer >= 1")
        self._min_samples = _int_arg("min_samples", min_samples, 2, self._window,
                                     f"an integer in [2, window={self._window}]")
        self._stale_rate = 3.0 * (1.0 - self._q)
        self._alloc()
        self._observed = self._increases = self._decreases = self._holds = 0
        self._last_n = self._last_latency = 0
        self.reset()

    cdef int _alloc(self) except -1:
        cdef Py_ssize_t size = self._window if self._mode == MODE_QUANTILE else 0
        PyMem_Free(self._ring_n)
        PyMem_Free(self._ring_l)
        PyMem_Free(self._items)
        PyMem_Free(self._cands)
        self._ring_n = self._ring_l = NULL
        self._items = NULL
        self._cands = NULL
        if size == 0:
            return 0
        self._ring_n = <int64_t*>PyMem_Malloc(size * sizeof(int64_t))
        self._ring_l = <int64_t*>PyMem_Malloc(size * sizeof(int64_t))
        self._items = <SlopeItem*>PyMem_Malloc(size * sizeof(SlopeItem))
        self._cands = <Py_ssize_t*>PyMem_Malloc((size + 1) * sizeof(Py_ssize_t))
        if self._ring_n == NULL or self._ring_l == NULL or self._items == NULL or self._cands == NULL:
            raise MemoryError()
        return 0

    def __dealloc__(self):
        PyMem_Free(self._ring_n)
        PyMem_Free(self._ring_l)
        PyMem_Free(self._items)
        PyMem_Free(self._cands)

    # ------------------------------------------------------------------ properties
    @property
    def current(self):
        return self._current

    @property
    def mode(self):
        return MODES[<int>self._mode]

    @property
    def budget_ns(self):
        return self._budget

    @budget_ns.setter
    def budget_ns(self, value):
        self._budget = _int_arg("budget_ns", value, 1, _INT64_MAX, _BUDGET_RULE)

    # ------------------------------------------------------------------ API
    def reset(self, initial=None):
        if initial is None:
            initial = self._initial
        else:
            initial = _int_arg("initial", initial, 1, self._max_batch,
                               f"an integer in [1, max_batch={self._max_batch}]")
        self._current = self._max_batch if self._mode == MODE_FIXED else initial
        self._count = 0
        self._head = 0
        self._interval = 0
        self._next_fit = self._min_samples
        self._over_n = self._max_batch + 1
        self._over_count = 0
        self._min_n = 1
        self._has_line = False
        self._line_n0 = self._line_l0 = self._line_d = self._line_dl = 0
        self._fit_a = self._fit_b = 0.0

    def observe(self, n, latency_ns):
        cdef int64_t nn = _as_int64(n, "n", 1, _N_RULE)
        cdef int64_t lat = _as_int64(latency_ns, "latency_ns", 0, _LATENCY_RULE)
        cdef int64_t old = self._current
        cdef int64_t new
        self._observed += 1
        self._last_n = nn
        self._last_latency = lat
        if self._mode == MODE_AIMD:
            new = self._aimd(old, nn, lat)
        elif self._mode == MODE_QUANTILE:
            new = self._quantile_step(old, nn, lat)
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

    def fit(self):
        if not self._has_line:
            return None
        return (self._fit_a, self._fit_b)

    def stats(self):
        return {
            "mode": MODES[<int>self._mode],
            "current": self._current,
            "budget_ns": self._budget,
            "observed": self._observed,
            "increases": self._increases,
            "decreases": self._decreases,
            "holds": self._holds,
            "last_n": self._last_n,
            "last_latency_ns": self._last_latency,
            "fit_a_ns": self._fit_a if self._has_line else None,
            "fit_b_ns": self._fit_b if self._has_line else None,
            "samples": self._count,
        }

    def __repr__(self):
        return f"<BatchSizer mode={MODES[<int>self._mode]} current={self._current} budget_ns={self._budget}>"

    # ------------------------------------------------------------------ AIMD
    cdef int64_t _decrease(self, int64_t cur) noexcept:
        cdef int64_t new = <int64_t>(<double>cur * self._backoff)  # one rounding, then floor (> 0)
        return new if new > 1 else 1

    cdef int64_t _aimd(self, int64_t cur, int64_t n, int64_t latency) noexcept:
        if latency > self._budget:
            return self._decrease(cur)
        if <double>latency >= self._hold_fraction * <double>self._budget:
            return cur
        if n >= cur:  # the limit was binding: a larger batch may fit too
            return self._max_batch if self._step >= self._max_batch - cur else cur + self._step
        return cur

    # ------------------------------------------------------------------ quantile regression
    cdef int64_t _quantile_step(self, int64_t cur, int64_t n, int64_t latency) noexcept:
        cdef Py_ssize_t slot = self._head
        cdef int64_t size = n if n < self._max_batch else self._max_batch
        self._ring_n[slot] = size
        self._ring_l[slot] = latency if latency < C_FIT_LATENCY_CAP_NS else C_FIT_LATENCY_CAP_NS
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
        if not self._has_line:  # no usable fit yet: explore like AIMD
            return self._aimd(cur, n, latency)
        if latency > self._budget:  # safety between refits
            return self._decrease(cur)
        return cur

    cdef int64_t _refit(self, int64_t cur, int64_t n, int64_t latency) noexcept:
        cdef int64_t over_n = self._over_n
        cdef int64_t max_n, target, x, cap, new, dec, budget
        cdef double b
        if self._has_line and self._over_count >= 3 and \
                <double>self._over_count > self._stale_rate * <double>self._interval:
            self._keep_recent(self._interval)
        self._interval = 0
        self._next_fit = self._refit_every
        self._over_n = self._max_batch + 1
        self._over_count = 0
        max_n = self._fit_line()
        if not self._has_line:  # one batch size only: no slope to fit
            return self._aimd(cur, n, latency)
        b = <double>self._line_dl / <double>self._line_d
        self._fit_b = b
        self._fit_a = <double>self._line_l0 - b * <double>self._line_n0
        budget = self._budget if self._budget < C_FIT_BUDGET_CAP_NS else C_FIT_BUDGET_CAP_NS
        if self._line_dl <= 0:
            # No size dependence: grow, unless the line is over budget at the current size already.
            if self._line_dl * (cur - self._line_n0) <= (budget - self._line_l0) * self._line_d:
                target = self._max_batch
            else:
                target = cur
        else:
            # the largest n with l0 + dl * (n - n0) / d <= budget
            x = self._line_n0 + _floor_div((budget - self._line_l0) * self._line_d, self._line_dl)
            target = 1 if x < 1 else (self._max_batch if x > self._max_batch else x)
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

    cdef void _keep_recent(self, int64_t k) noexcept:
        """Drop all but the newest ``k`` samples; they move to slots 0..k-1, oldest first."""
        cdef SlopeItem* tmp = self._items   # scratch: p holds the size, d the latency
        cdef Py_ssize_t i, j, start
        if k >= self._count:
            return
        start = self._head - k
        if start < 0:
            start += self._window
        for i in range(k):
            j = start + i
            if j >= self._window:
                j -= self._window
            tmp[i].p = self._ring_n[j]
            tmp[i].d = self._ring_l[j]
        for i in range(k):
            self._ring_n[i] = tmp[i].p
            self._ring_l[i] = tmp[i].d
        self._count = k
        self._head = k if k < self._window else 0

    cdef int64_t _fit_line(self) noexcept:
        """Fit the window; set the line (or clear ``_has_line`` if degenerate); return the largest size."""
        cdef int64_t* ns = self._ring_n
        cdef int64_t* ls = self._ring_l
        cdef Py_ssize_t* cands = self._cands
        cdef Py_ssize_t count = self._count
        cdef Py_ssize_t i, c, e, k, j, ncand, pivot, other
        cdef int64_t n_min, n_max, v, n0, l0, d, dl, best, r, nk
        cdef int rotations
        cdef bint moved, dup
        n_min = n_max = ns[0]
        for i in range(1, count):
            v = ns[i]
            if v < n_min:
                n_min = v
            elif v > n_max:
                n_max = v
        self._min_n = n_min
        if n_min == n_max or count < self._min_samples:
            self._has_line = False
            return n_max
        # Warm start: the sample nearest the previous line (exact cross products).
        pivot = 0
        if self._has_line:
            n0 = self._line_n0
            l0 = self._line_l0
            d = self._line_d
            dl = self._line_dl
            best = _abs64((ls[0] - l0) * d - dl * (ns[0] - n0))
            for i in range(1, count):
                r = _abs64((ls[i] - l0) * d - dl * (ns[i] - n0))
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
            cands[0] = other
            ncand = 1
            for i in range(count):
                if (ls[i] - l0) * d - dl * (ns[i] - n0) == 0:
                    cands[ncand] = i
                    ncand += 1
            if ncand - 1 == count:  # every sample on the line: zero loss
                break
            moved = False
            for c in range(ncand):
                k = cands[c]
                nk = ns[k]
                if nk == n0:
                    continue
                dup = False
                for e in range(c):
                    if ns[cands[e]] == nk:
                        dup = True
                        break
                if dup:
                    continue
                if rotations >= C_MAX_ROTATIONS:
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
        self._has_line = True
        self._line_n0 = n0
        self._line_l0 = l0
        self._line_d = d
        self._line_dl = dl
        return n_max

    cdef Py_ssize_t _rotate(self, Py_ssize_t k, int64_t dc, int64_t dlc) noexcept:
        """Best line through sample ``k``: the slot of its second sample, or -1 if the slope dlc/dc is optimal.

        ``dc == 0`` means there is no current slope to test.
        """
        cdef int64_t* ns = self._ring_n
        cdef int64_t* ls = self._ring_l
        cdef SlopeItem* items = self._items
        cdef int64_t nk = ns[k]
        cdef int64_t lk = ls[k]
        cdef int64_t above = 0      # P: weight of the larger sizes (their pinball weight is q)
        cdef int64_t below = 0      # M: weight of the smaller sizes (1 - q)
        cdef int64_t w_lt = 0       # weight of the slopes below the current one
        cdef int64_t w_le = 0       # ... at or below it
        cdef int64_t d, p, c, w
        cdef Py_ssize_t i, m = 0
        cdef double threshold
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
                c = p * dc - dlc * d    # the sign of p/d - dlc/dc
                if c <= 0:
                    w_le += d
                    if c < 0:
                        w_lt += d
            items[m].key = <double>p / <double>d
            items[m].p = p
            items[m].d = d
            items[m].slot = i
            m += 1
        # The loss falls while the weight of the slopes below s is under T = q*P + (1-q)*M; compare
        # W - M with q * (P - M) so that the only rounding is that one product.
        threshold = self._q * <double>(above - below)
        if dc > 0 and <double>(w_lt - below) <= threshold and <double>(w_le - below) >= threshold:
            return -1   # the current slope is a minimum: no need to sort
        qsort(items, <size_t>m, sizeof(SlopeItem), _cmp_items)
        w = 0
        for i in range(m):
            w += items[i].d
            if <double>(w - below) >= threshold:
                return items[i].slot
        return items[m - 1].slot  # not reached: the total weight P + M is at least T
