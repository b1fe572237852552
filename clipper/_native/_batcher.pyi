"""Per-replica batch-size controllers (Cython; pure twin in batcher_py.py).

Each model replica has a :class:`BatchSizer` that sets the largest batch it
may take next from the measured latency of its batches against the model's
latency budget. ``batcher_py``'s module docstring describes the policy and
the exact quantile-regression fit in full; both implementations take the
same decisions for the same inputs.
"""

MODES: tuple[str, str, str]
"""The modes: ``"fixed"``, ``"aimd"``, ``"quantile"``."""
MAX_BATCH_LIMIT: int
"""The largest ``max_batch`` accepted (2**20)."""
MAX_WINDOW: int
"""The largest ``window`` accepted (2**16)."""
FIT_LATENCY_CAP_NS: int
"""Latencies above this (2**40 ns, about 18 minutes) count as this in the quantile fit."""
FIT_BUDGET_CAP_NS: int
"""A budget above this (2**41 ns) counts as this when the fitted line picks the size."""
MAX_ROTATIONS: int
"""Guard on the vertex-descent steps of one quantile fit."""

class BatchSizer:
    """The batch-size controller of one model replica. Not thread-safe: use it from the event loop.

    Modes:

    * ``"fixed"``: the size is always ``max_batch``.
    * ``"aimd"``: after a batch of ``n`` queries that took ``L`` ns, the
      size ``c`` becomes ``max(1, floor(c * backoff))`` if ``L > budget``;
      holds if ``L >= hold_fraction * budget``; otherwise grows by ``step``
      (up to ``max_batch``) if the batch was full (``n >= c``) and holds if
      it was not.
    * ``"quantile"``: every ``refit_every`` observations (the first fit as
      soon as ``min_samples`` are in) it fits the ``quantile`` of latency as
      ``a + b * n`` over the last ``window`` batches by exact linear quantile
      regression and runs the largest ``n`` in ``[1, max_batch]`` with
      ``a + b * n <= budget`` (``max_batch`` if ``b <= 0``, unless the line
      is over budget at the current size: then it holds). A refit raises the
      size to at most ``max(2 * hi - lo, hi + step)``, ``lo..hi`` the sizes in
      the window, and not to a size that went over budget since the last
      refit; an interval with many over-budget batches drops the older
      samples. Between refits the size holds, but a batch over budget cuts it
      at once as in AIMD. Before the first fit, and whenever the window holds
      a single batch size, it follows the AIMD rule.
    """

    def __init__(self, mode: str = "aimd", *, budget_ns: int, max_batch: int = 1024, initial: int = 1,
                 step: int = 2, backoff: float = 0.9, hold_fraction: float = 0.9, quantile: float = 0.99,
                 window: int = 512, refit_every: int = 32, min_samples: int = 16) -> None:
        """Validate every argument; a bad one raises ValueError naming it, its value and the rule.

        Rules: ``mode`` in MODES; ``1 <= budget_ns < 2**63``;
        ``1 <= max_batch <= MAX_BATCH_LIMIT``; ``1 <= initial <= max_batch``
        (ignored by ``"fixed"``, which starts at ``max_batch``); ``step >= 1``;
        ``0 < backoff < 1``; ``0 < hold_fraction <= 1``; ``0 < quantile < 1``;
        ``2 <= window <= MAX_WINDOW``; ``refit_every >= 1``;
        ``2 <= min_samples <= window``. A non-integer where an integer is
        expected raises TypeError.
        """
    @property
    def current(self) -> int:
        """The largest batch size to use for the next batch."""
    @property
    def mode(self) -> str:
        """``"fixed"``, ``"aimd"`` or ``"quantile"``."""
    @property
    def budget_ns(self) -> int:
        """The model's latency budget per batch in ns; settable (must be >= 1).

        A new budget applies from the next observation (AIMD) or the next
        refit (quantile; over-budget batches cut the size at once).
        """
    @budget_ns.setter
    def budget_ns(self, value: int) -> None: ...
    def observe(self, n: int, latency_ns: int) -> int:
        """Record a finished batch of ``n >= 1`` queries that took ``latency_ns >= 0`` ns; return the new size.

        ValueError for values out of range, TypeError for non-integers.
        """
    def reset(self, initial: int | None = None) -> None:
        """Forget the samples and the fit; the size becomes ``initial`` (default: the constructor's).

        The cumulative counters of :meth:`stats` are kept.
        """
    def fit(self) -> tuple[float, float] | None:
        """The fitted line ``(a_ns, b_ns_per_query)`` in force, or None (other modes, no fit yet, degenerate window)."""
    def stats(self) -> dict:
        """``mode``, ``current``, ``budget_ns``; cumulative ``observed``, ``increases``, ``decreases``, ``holds``;
        ``last_n``, ``last_latency_ns`` (0 before the first observation); ``fit_a_ns``, ``fit_b_ns`` (None
        without a fit); ``samples`` (in the quantile window)."""
