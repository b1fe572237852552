# Header of clipper._native._batcher: per-replica batch-size controllers.
# Pure-Python twin: batcher_py.py, which also documents the policy and the quantile fit.

cimport cython
from libc.stdint cimport int64_t

cdef enum Mode:
    MODE_FIXED = 0       # always max_batch
    MODE_AIMD = 1        # additive increase, multiplicative decrease
    MODE_QUANTILE = 2    # quantile regression of latency on batch size

ctypedef struct SlopeItem:
    double key           # p / d rounded to a double: orders the items except among equal doubles
    int64_t p            # latency difference to the pivot sample (ns), signed so that d > 0
    int64_t d            # |batch size difference| to the pivot (> 0); also the item's weight
    Py_ssize_t slot      # ring slot of the sample; the last tie-break, so the order is total

@cython.final
cdef class BatchSizer:
    # configuration
    cdef Mode _mode
    cdef int64_t _budget             # latency budget in ns (> 0)
    cdef int64_t _max_batch          # hard cap on the size, <= MAX_BATCH_LIMIT
    cdef int64_t _initial            # the size after construction and reset()
    cdef int64_t _step               # additive increase, clipped to max_batch
    cdef double _backoff             # multiplicative decrease factor, in (0, 1)
    cdef double _hold_fraction       # no growth at or above this fraction of the budget
    cdef double _q                   # the latency quantile the fit models
    cdef Py_ssize_t _window          # samples kept for the fit (ring size)
    cdef int64_t _refit_every        # observations between fits
    cdef int64_t _min_samples        # samples before the first fit
    cdef double _stale_rate          # 3 * (1 - q): over-budget share of an interval that drops old samples
    # state
    cdef int64_t _current            # the size for the next batch
    cdef int64_t* _ring_n            # sample batch sizes, clipped to max_batch (quantile mode only)
    cdef int64_t* _ring_l            # sample latencies in ns, clipped to FIT_LATENCY_CAP_NS
    cdef SlopeItem* _items           # scratch for one rotation: one item per sample
    cdef Py_ssize_t* _cands          # scratch: samples on the current line
    cdef Py_ssize_t _count           # samples in the ring
    cdef Py_ssize_t _head            # the slot the next sample goes to
    cdef int64_t _interval           # samples recorded since the last refit (or reset)
    cdef int64_t _next_fit           # value of _interval at which the next refit runs
    cdef int64_t _over_n             # smallest size over budget since the last refit (max_batch + 1: none)
    cdef int64_t _over_count         # batches over budget since the last refit
    cdef int64_t _min_n              # the smallest size in the window at the last fit
    cdef bint _has_line              # a fit is in force (the last one was not degenerate)
    cdef int64_t _line_n0, _line_l0  # a sample on the fitted line
    cdef int64_t _line_d, _line_dl   # the line's slope as dl / d with d > 0
    cdef double _fit_a, _fit_b       # the same line as a + b * n in ns
    # cumulative counters for stats(); reset() keeps them
    cdef int64_t _observed, _increases, _decreases, _holds
    cdef int64_t _last_n, _last_latency

    cdef int _alloc(self) except -1
    cdef int64_t _decrease(self, int64_t cur) noexcept
    cdef int64_t _aimd(self, int64_t cur, int64_t n, int64_t latency) noexcept
    cdef int64_t _quantile_step(self, int64_t cur, int64_t n, int64_t latency) noexcept
    cdef int64_t _refit(self, int64_t cur, int64_t n, int64_t latency) noexcept
    cdef void _keep_recent(self, int64_t k) noexcept
    cdef int64_t _fit_line(self) noexcept
    cdef Py_ssize_t _rotate(self, Py_ssize_t k, int64_t dc, int64_t dlc) noexcept
