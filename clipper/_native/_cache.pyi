"""The prediction cache (Cython; pure twin in cache_py.py).

Maps ``(deployment id, input bytes)`` to a model output, with exact key
comparison, a memory budget in bytes and CLOCK (second-chance) eviction. A
lookup that finds the same input in flight joins it instead of computing it
again. See the module docstring of ``_cache.pyx`` for the policy.
"""

from typing import Any

HIT: int
"""``lookup`` found a ready entry: the second item is its output."""
PENDING: int
"""``lookup`` found the input in flight: the second item is the leader stored by the lookup that missed."""
MISS: int
"""``lookup`` found nothing and reserved a pending entry: the second item is its token."""

def _output_nbytes(output: Any) -> int:
    """What the cache charges for ``output`` when fill is given no nbytes (for tests)."""

class PredictionCache:
    """Exact-match prediction cache with a byte budget and CLOCK eviction.

    Every entry is charged ``len(key) + output size + entry_overhead`` bytes
    (pending entries: key and overhead). When a reservation (a MISS) or a
    ``fill`` takes the cache over its budget, ready entries are evicted until
    ``used_bytes <= budget_bytes``; pending entries are never evicted, so
    after any call only they can keep the cache over its budget. Not
    thread-safe: use it from one thread (the event loop).
    """

    def __init__(self, budget_bytes: int, *, entry_overhead: int = 96, hash_mask: int = -1) -> None:
        """``budget_bytes`` must be positive and ``entry_overhead`` >= 0 (else ValueError).

        ``hash_mask`` is ANDed into every 64-bit key hash. Production leaves it
        at -1 (all bits); tests pass a tiny mask to force collisions, which
        slows the cache down but never makes it inexact.
        """
    def lookup(self, deployment: int, key: Any, leader: Any) -> tuple[int, Any]:
        """Look ``key`` up for ``deployment`` (an int id; each deployed model version instance has its own).

        ``key`` is ``bytes``, ``str`` (hashed as UTF-8) or any object with a
        C-contiguous buffer (bytearray, memoryview, numpy array); its raw bytes
        are the key. Returns ``(HIT, output)`` and marks the entry recently
        used; ``(PENDING, leader)`` with the leader of the computation in
        flight; or ``(MISS, token)`` after reserving a pending entry that holds
        ``leader`` and a copy of the key (which may evict ready entries to keep
        the budget). Raises TypeError for a key without a
        buffer (or one holding Python objects) and ValueError for a
        non-contiguous buffer.
        """
    def fill(self, token: int, output: Any, nbytes: int = -1) -> bool:
        """Store ``output`` for the reservation ``token``; True if it is cached when this returns.

        False, with nothing stored, when the token is stale (filled, failed,
        invalidated or cleared) or when the entry alone would exceed the budget
        (the reservation is then dropped). ``nbytes`` is the output's size for
        accounting; -1 estimates it (numpy array or memoryview: ``nbytes``;
        bytes, bytearray, str: ``len``; list, tuple, dict: 64 each plus 8 a
        slot, and what they hold, each item 16 plus its length or ``nbytes``,
        walked to at most 65,536 objects, past which it is charged more than
        any budget and not cached; anything else: 16). Filling may evict
        ready entries, in the rare worst case the new one too (when pending
        entries fill the budget). A late fill is still stored.
        """
    def fail(self, token: int) -> Any | None:
        """Drop the reservation ``token`` so the next lookup of its key misses; return its leader (None if stale)."""
    def peek_leader(self, token: int) -> Any | None:
        """The leader stored for the pending ``token`` (None if stale)."""
    def set_leader(self, token: int, leader: Any) -> bool:
        """Replace the leader of the pending ``token``; False if the token is stale."""
    def invalidate(self, deployment: int) -> int:
        """Remove every entry, ready or pending, of ``deployment``; return how many. Its tokens become stale."""
    def clear(self) -> None:
        """Remove every entry; all pending tokens become stale. Counters are kept."""
    def __len__(self) -> int:
        """Entries, ready and pending."""
    @property
    def budget_bytes(self) -> int:
        """The memory budget in bytes."""
    @property
    def used_bytes(self) -> int:
        """Bytes charged by all entries."""
    def stats(self) -> dict[str, int | float]:
        """Sizes and cumulative counters (``clear`` does not reset them).

        Keys: ``entries``, ``ready``, ``pending``, ``used_bytes``,
        ``budget_bytes``; ``lookups`` (= ``hits + joins + misses``), ``hits``,
        ``misses``, ``joins`` (lookups answered PENDING); ``fills`` (outputs
        stored) and ``fill_rejects`` (fills refused: stale token or too big);
        ``fails`` (reservations dropped by ``fail``); ``evictions``;
        ``invalidations`` (entries removed by ``invalidate``); ``hit_ratio``
        (``hits / lookups``, 0.0 before the first lookup).
        """
