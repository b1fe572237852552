"""Pure-Python twin of ``clipper._native._cache`` (same API, same behaviour).

Loaded instead of the Cython module when ``CLIPPER_NO_EXTENSIONS=1``; the
tests run both. It is also the readable reference for the policy:

* Exact keys: an entry matches when the deployment id and the key bytes are
  equal. The masked hash only picks a bucket; colliding hashes share it.
* Budget: each entry is charged ``len(key) + output size + entry_overhead``
  bytes (a pending entry has no output yet). Whenever a reservation or a
  fill takes the cache over its budget, ready entries are evicted until
  ``used_bytes <= budget_bytes`` or none is left; pending entries are never
  evicted. An output that alone would exceed the budget is refused.
* CLOCK (second chance): entries live in a slot list swept by a persistent
  hand. Fill and every hit set a ready entry's reference bit; the hand
  clears set bits and evicts the first ready entry whose bit is clear,
  passing over free and pending slots. Freed slots are reused LIFO, and the
  slot list doubles when full, exactly as in the native module, so both
  evict the same entries for the same calls.
* Tokens come from a counter and are never reused.
"""

from __future__ import annotations

import operator

from numpy import ndarray as _ndarray

HIT = 0
PENDING = 1
MISS = 2

_INITIAL_CAPACITY = 8       # slots after construction and clear()
_OTHER_OUTPUT_NBYTES = 16   # size charged for a scalar output (int, float, None, ...)
# A list, tuple or dict output is charged what it holds (as _cache.pyx): each container this much plus a
# slot per item (two per dict item), each scalar in it the above, each str or bytes its length plus the
# above; past _MAX_WALK_NODES objects, _UNMEASURED_NBYTES (more than any budget: not cached).
_CONTAINER_NBYTES = 64
_SLOT_NBYTES = 8
_MAX_WALK_NODES = 65536
_UNMEASURED_NBYTES = 1 << 62
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_SSIZE_MAX = (1 << 63) - 1

# Slot states.
_FREE = 0
_PENDING = 1
_READY = 2


class _Entry:
    """One slot's contents."""

    __slots__ = ("state", "hash", "deployment", "key", "obj", "token", "charge", "ref")

    def __init__(self, state, hash_, deployment, key, obj, token, charge):
        self.state = state
        self.hash = hash_
        self.deployment = deployment
        self.key = key          # bytes
        self.obj = obj          # leader while PENDING, output once READY
        self.token = token
        self.charge = charge    # bytes counted in used_bytes
        self.ref = False        # CLOCK reference bit


def _int64(value, what: str) -> int:
    value = operator.index(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise OverflowError(f"{what} {value} does not fit in a signed 64-bit integer")
    return value


def _ssize(value, what: str) -> int:
    value = operator.index(value)
    if not -_SSIZE_MAX - 1 <= value <= _SSIZE_MAX:
        raise OverflowError(f"{what} {value} does not fit in a signed 64-bit integer")
    return value


def _format_has_objects(fmt: str) -> bool:
    """True when a struct-module format has an 'O' item (text between colons is a field name)."""
    in_name = False
    for ch in fmt:
        if ch == ":":
            in_name = not in_name
        elif ch == "O" and not in_name:
            return True
    return False


def _key_bytes(key) -> bytes:
    """The raw bytes of a cache key: bytes, str (UTF-8) or a C-contiguous buffer."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    try:
        view = memoryview(key)
    except TypeError:
        raise TypeError(
            f"cache key must be bytes, str or an object with a C-contiguous buffer "
            f"(numpy array, memoryview, bytearray); got {type(key).__name__}"
        ) from None
    with view:
        if not view.c_contiguous:
            raise ValueError(f"cache key must be a C-contiguous buffer; this {type(key).__name__} is not")
        if _format_has_objects(view.format):
            raise TypeError(
                f"cache key of type {type(key).__name__} holds Python objects (format {view.format!r}); "
                "its bytes are pointers, not data"
            )
        return view.tobytes()


def _estimate_nbytes(output) -> int:
    if isinstance(output, (bytes, bytearray, str)):
        return len(output)
    if isinstance(output, (_ndarray, memoryview)):
        return max(int(output.nbytes), 0)
    if isinstance(output, (list, tuple, dict)):
        return _walk_nbytes(output)
    return _OTHER_OUTPUT_NBYTES


def _walk_nbytes(output) -> int:
    stack = [output]
    total = nodes = 0
    while stack:
        o = stack.pop()
        nodes += 1
        if nodes > _MAX_WALK_NODES:
            return _UNMEASURED_NBYTES
        if isinstance(o, (list, tuple)):
            total += _CONTAINER_NBYTES + _SLOT_NBYTES * len(o)
            stack.extend(o)
        elif isinstance(o, dict):
            total += _CONTAINER_NBYTES + 2 * _SLOT_NBYTES * len(o)
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (bytes, bytearray, str)):
            total += _OTHER_OUTPUT_NBYTES + len(o)
        elif isinstance(o, (_ndarray, memoryview)):
            total += _OTHER_OUTPUT_NBYTES + max(int(o.nbytes), 0)
        else:
            total += _OTHER_OUTPUT_NBYTES
    return total


def _output_nbytes(output) -> int:
    """What the cache charges for ``output`` when fill is given no nbytes (for tests)."""
    return _estimate_nbytes(output)


class PredictionCache:
    """Exact-match prediction cache with a byte budget and CLOCK eviction.

    See the module docstring for the policy and ``_cache.pyi`` for the API.
    """

    __slots__ = (
        "_budget", "_overhead", "_mask", "_slots", "_free", "_buckets", "_pending", "_hand",
        "_count", "_ready", "_used", "_next_token", "_lookups", "_hits", "_misses", "_joins",
        "_fills", "_fill_rejects", "_fails", "_evictions", "_invalidations",
    )

    def __init__(self, budget_bytes: int, *, entry_overhead: int = 96, hash_mask: int = -1) -> None:
        budget_bytes = _ssize(budget_bytes, "budget_bytes")
        entry_overhead = _ssize(entry_overhead, "entry_overhead")
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        if entry_overhead < 0:
            raise ValueError(f"entry_overhead must be >= 0, got {entry_overhead}")
        if not isinstance(hash_mask, int):
            raise TypeError(f"hash_mask must be an int, got {type(hash_mask).__name__}")
        self._mask = hash_mask & 0xFFFFFFFFFFFFFFFF
        self._budget = budget_bytes
        self._overhead = entry_overhead
        self._next_token = 1
        self._lookups = self._hits = self._misses = self._joins = 0
        self._fills = self._fill_rejects = self._fails = self._evictions = self._invalidations = 0
        self._reset()

    # -- storage ---------------------------------------------------------------

    def _reset(self) -> None:
        # A free slot holds None; typed as what the code reads, which it does only at occupied slots (the native
        # twin's layout; no per-read check).
        self._slots: list[_Entry] = [None] * _INITIAL_CAPACITY  # type: ignore[list-item]
        # Free slots as a stack; the last item is taken first, so slot 0 goes first.
        self._free: list[int] = list(range(_INITIAL_CAPACITY - 1, -1, -1))
        self._buckets: dict[int, list[int]] = {}   # masked hash -> slots with that hash
        self._pending: dict[int, int] = {}         # token -> slot of each PENDING entry
        self._hand = 0
        self._count = 0
        self._ready = 0
        self._used = 0

    def _take_slot(self) -> int:
        if not self._free:
            # Double the slots; the first new one is taken first.
            old = len(self._slots)
            self._slots.extend([None] * old)  # type: ignore[list-item]
            self._free.extend(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _find(self, h: int, deployment: int, key: bytes) -> int:
        for slot in self._buckets.get(h, ()):
            e = self._slots[slot]
            if e.deployment == deployment and e.key == key:
                return slot
        return -1

    def _pending_slot(self, token) -> int:
        if not isinstance(token, int):
            raise TypeError(f"token must be an int, got {type(token).__name__}")
        return self._pending.get(token, -1)

    def _unlink(self, slot: int):
        """Remove the entry in ``slot``; return its output or leader."""
        e = self._slots[slot]
        if e.state == _PENDING:
            del self._pending[e.token]
        else:
            self._ready -= 1
        bucket = self._buckets[e.hash]
        bucket.remove(slot)
        if not bucket:
            del self._buckets[e.hash]
        self._used -= e.charge
        self._count -= 1
        self._slots[slot] = None  # type: ignore[call-overload]
        self._free.append(slot)
        return e.obj

    def _evict(self) -> None:
        """Advance the CLOCK hand until the budget holds or no ready entry is left."""
        dead = []   # outputs are released after the loop
        capacity = len(self._slots)
        while self._used > self._budget and self._ready > 0:
            slot = self._hand
            self._hand = slot + 1 if slot + 1 < capacity else 0
            e = self._slots[slot]
            if e is None or e.state != _READY:
                continue
            if e.ref:
                e.ref = False
                continue
            dead.append(self._unlink(slot))
            self._evictions += 1

    # -- the API ---------------------------------------------------------------

    def lookup(self, deployment: int, key, leader) -> tuple[int, object]:
        """Look ``key`` up for ``deployment``: ``(HIT, output)``, ``(PENDING, leader)`` or ``(MISS, token)``."""
        deployment = _int64(deployment, "deployment")
        key = _key_bytes(key)
        h = hash((deployment, key)) & self._mask
        self._lookups += 1
        slot = self._find(h, deployment, key)
        if slot >= 0:
            e = self._slots[slot]
            if e.state == _READY:
                e.ref = True
                self._hits += 1
                return (HIT, e.obj)
            self._joins += 1
            return (PENDING, e.obj)
        slot = self._take_slot()
        token = self._next_token
        self._next_token += 1
        self._misses += 1
        e = _Entry(_PENDING, h, deployment, key, leader, token, len(key) + self._overhead)
        self._slots[slot] = e
        self._buckets.setdefault(h, []).append(slot)
        self._pending[token] = slot
        self._count += 1
        self._used += e.charge
        if self._used > self._budget:
            self._evict()
        return (MISS, token)

    def fill(self, token: int, output, nbytes: int = -1) -> bool:
        """Make the reservation ``token`` ready with ``output``; True if it is cached afterwards."""
        nbytes = _ssize(nbytes, "nbytes")
        if nbytes < -1:
            raise ValueError(f"nbytes must be >= 0, or -1 to estimate it; got {nbytes}")
        size = _estimate_nbytes(output) if nbytes == -1 else nbytes
        slot = self._pending_slot(token)
        if slot < 0:
            self._fill_rejects += 1
            return False
        e = self._slots[slot]
        if size > self._budget - e.charge:
            # This entry alone would exceed the budget: drop the reservation.
            self._unlink(slot)
            self._fill_rejects += 1
            return False
        del self._pending[token]
        self._used += size
        e.charge += size
        e.state = _READY
        e.ref = True
        e.obj = output
        self._ready += 1
        self._fills += 1
        if self._used > self._budget:
            self._evict()
        return self._slots[slot] is e

    def fail(self, token: int):
        """Drop the reservation ``token``; return its leader, or None if the token is stale."""
        slot = self._pending_slot(token)
        if slot < 0:
            return None
        self._fails += 1
        return self._unlink(slot)

    def peek_leader(self, token: int):
        """The leader stored for the pending ``token``, or None if the token is stale."""
        slot = self._pending_slot(token)
        return None if slot < 0 else self._slots[slot].obj

    def set_leader(self, token: int, leader) -> bool:
        """Replace the leader stored for the pending ``token``; False if the token is stale."""
        slot = self._pending_slot(token)
        if slot < 0:
            return False
        self._slots[slot].obj = leader
        return True

    def invalidate(self, deployment: int) -> int:
        """Remove every entry, ready or pending, of ``deployment``; return how many."""
        deployment = _int64(deployment, "deployment")
        victims = [slot for slot, e in enumerate(self._slots) if e is not None and e.deployment == deployment]
        dead = [self._unlink(slot) for slot in victims]   # released after the loop
        self._invalidations += len(dead)
        return len(dead)

    def clear(self) -> None:
        """Remove every entry; pending tokens become stale. The counters are kept."""
        old = (self._slots, self._buckets, self._pending)
        self._reset()
        del old   # outputs and leaders are released only now

    def __len__(self) -> int:
        return self._count

    @property
    def budget_bytes(self) -> int:
        """The memory budget in bytes."""
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes charged by all entries (keys, outputs and per-entry overhead)."""
        return self._used

    def stats(self) -> dict:
        """Sizes and cumulative counters (see ``_cache.pyi``)."""
        return {
            "entries": self._count,
            "ready": self._ready,
            "pending": self._count - self._ready,
            "used_bytes": self._used,
            "budget_bytes": self._budget,
            "lookups": self._lookups,
            "hits": self._hits,
            "misses": self._misses,
            "joins": self._joins,
            "fills": self._fills,
            "fill_rejects": self._fill_rejects,
            "fails": self._fails,
            "evictions": self._evictions,
            "invalidations": self._invalidations,
            "hit_ratio": self._hits / self._lookups if self._lookups else 0.0,
        }

    def __repr__(self) -> str:
        return f"<PredictionCache entries={self._count} used_bytes={self._used} budget_bytes={self._budget}>"
