# cython: language_level=3
"""The prediction cache (native). See cache_py.py for the pure-Python twin.

The cache maps ``(deployment id, input bytes)`` to a model output. It answers
every lookup with one of three results:

* ``(HIT, output)``: a ready entry; its CLOCK reference bit is set.
* ``(PENDING, leader)``: the same input is being computed; the caller joins
  the ``leader`` stored by the lookup that missed.
* ``(MISS, token)``: nothing cached; a PENDING entry now holds the caller's
  ``leader`` and a copy of the key. ``fill(token, output)`` makes it ready,
  ``fail(token)`` removes it so the next lookup misses again.

Keys are exact: an entry matches only when the deployment id, the key length
and the key bytes (memcmp) are equal. The 64-bit hash (this module's own,
seeded per process) only chooses where to look, so colliding hashes cost
time, never correctness.

Memory: every entry is charged ``len(key) + output size + entry_overhead``
bytes (a pending entry has no output yet). Whenever a reservation or a fill
takes the cache over its budget, it evicts ready entries until
``used_bytes <= budget_bytes`` or no ready entry is left. So after every call
only pending entries can keep the cache over its budget; they are never
evicted. An output that alone would exceed the budget is refused.

Eviction is CLOCK (second chance). Entries live in a slot array; a
persistent hand sweeps it in slot order, wrapping around. A ready entry's
reference bit is set when it is filled and on every hit. When the hand
reaches a ready entry whose bit is set, it clears the bit and moves on; the
first ready entry with a clear bit is evicted. Free and pending slots are
passed over. A freed slot is reused first (LIFO free list), so a new entry
usually lands just behind the hand and gets a full turn before it is looked
at. The twin uses the same slots, free list and hand, so both evict the same
entries for the same sequence of calls.

The index is open addressing with linear probing over ``2 * capacity`` cells,
each holding the hash and the slot; deletions shift the following cells back
(no tombstones). The slot array and the index double when the slots run out.
Tokens come from a counter and are never reused; a token names its
reservation until it is filled, failed, invalidated or cleared, and is stale
afterwards.
"""

from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.long cimport PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

from os import urandom as _urandom

from numpy import ndarray as _ndarray

HIT = 0
PENDING = 1
MISS = 2

# The same ints as Python objects in C globals: the hot path builds its tuples from these.
cdef object _HIT = HIT
cdef object _PENDING = PENDING
cdef object _MISS = MISS

cdef enum:
    INITIAL_CAPACITY = 8         # slots after construction and clear(); a power of two
    OTHER_OUTPUT_NBYTES = 16     # size charged for a scalar output (int, float, None, ...)
    # A list, tuple or dict output (a model answering in msgpack) is charged what it holds: each
    # container this much plus a slot per item (two per dict item), each scalar in it the above, each
    # str or bytes in it its length plus the above. Past MAX_WALK_NODES objects it is not measured
    # further and charged UNMEASURED_NBYTES: more than any budget, so it is not cached.
    CONTAINER_NBYTES = 64
    SLOT_NBYTES = 8
    MAX_WALK_NODES = 65536

cdef Py_ssize_t UNMEASURED_NBYTES = (<Py_ssize_t>1) << 62

# Hash constants: odd 64-bit numbers with balanced bits, drawn at random for this module.
cdef uint64_t _MUL = 0xC7A3FD80FE32B0EDULL     # scrambles an accumulator after each word
cdef uint64_t _FIN1 = 0xB0C5354DB0012DB7ULL    # finalizer, first multiply
cdef uint64_t _FIN2 = 0xAC903484F6ACFBDDULL    # finalizer, second multiply
cdef uint64_t _DEP = 0x748A82A39C3A23FDULL     # spreads the deployment id into the seed
cdef uint64_t _LEN = 0x45BADA291A545855ULL     # spreads the key length into the seed
cdef uint64_t _L1 = 0x253C4F90CA654EE5ULL      # lane offsets for long keys
cdef uint64_t _L2 = 0x248341315E76F275ULL
cdef uint64_t _L3 = 0xD920F1EE5BB10A47ULL
cdef uint64_t _L4 = 0x9A7353669385BAEFULL
cdef uint64_t _L5 = 0x6495136D3AA5350BULL
cdef uint64_t _L6 = 0xA68ECCC19E98D027ULL
# A per-process secret in every hash: keys sent by clients cannot be chosen to collide on purpose
# (that would only cost time, never exactness, but a long probe run is a denial of service).
cdef uint64_t _SEED = int.from_bytes(_urandom(8), "little")


cdef inline uint64_t _rotl(uint64_t x, unsigned int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _load_word(const uint8_t* p) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, p, 8)    # unaligned load; native byte order is fine for an in-process hash
    return w


cdef inline uint64_t _absorb(uint64_t acc, uint64_t w) noexcept nogil:
    # One multiply per word: the multiply carries low bits upwards, the rotation before it
    # brings the high bits of the last product down, so every bit keeps mixing with every other.
    return _rotl(acc ^ w, 29) * _MUL


cdef inline uint64_t _avalanche(uint64_t h) noexcept nogil:
    # xorshift-multiply finalizer: every input bit reaches every output bit.
    h ^= h >> 32
    h *= _FIN1
    h ^= h >> 29
    h *= _FIN2
    h ^= h >> 32
    return h


cdef uint64_t _hash_bytes(const uint8_t* p, Py_ssize_t n, int64_t deployment) noexcept nogil:
    """64-bit hash of ``n`` bytes at ``p`` for one deployment (the length is mixed in)."""
    cdef const uint8_t* end = p + n
    cdef uint64_t h = _avalanche(_SEED ^ (<uint64_t>deployment * _DEP + <uint64_t>n * _LEN))
    cdef uint64_t a, b, c, d, e, f, tail = 0
    if n >= 48:
        # Six independent lanes of 8 bytes: the multiplies of one 48-byte stripe overlap, so
        # long keys (a 784-float input is 3136 bytes) hash at about the multiplier's throughput.
        a = h ^ _L1
        b = h ^ _L2
        c = h ^ _L3
        d = h ^ _L4
        e = h ^ _L5
        f = h ^ _L6
        while end - p >= 48:
            a = _absorb(a, _load_word(p))
            b = _absorb(b, _load_word(p + 8))
            c = _absorb(c, _load_word(p + 16))
            d = _absorb(d, _load_word(p + 24))
            e = _absorb(e, _load_word(p + 32))
            f = _absorb(f, _load_word(p + 40))
            p += 48
        h = _absorb(_absorb(_absorb(_absorb(_absorb(_absorb(h, a), b), c), d), e), f)
    while end - p >= 8:
        h = _absorb(h, _load_word(p))
        p += 8
    if p < end:
        memcpy(&tail, p, <size_t>(end - p))
        h = _absorb(h, tail)
    return _avalanche(h)


cdef bint _format_has_objects(const char* fmt) noexcept:
    # True when a struct-module format string has an 'O' (PyObject*) item; text
    # between colons is a field name and is skipped.
    cdef bint in_name = False
    if fmt == NULL:
        return False
    while fmt[0] != 0:
        if fmt[0] == b':':
            in_name = not in_name
        elif fmt[0] == b'O' and not in_name:
            return True
        fmt += 1
    return False


cdef int _get_key_buffer(object key, Py_buffer* view) except -1:
    """Get a C-contiguous buffer over ``key``'s bytes, or raise TypeError/ValueError."""
    if not PyObject_CheckBuffer(key):
        raise TypeError(
            f"cache key must be bytes, str or an object with a C-contiguous buffer "
            f"(numpy array, memoryview, bytearray); got {type(key).__name__}")
    try:
        PyObject_GetBuffer(key, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, ValueError) as exc:
        raise ValueError(
            f"cache key must be a C-contiguous buffer; this {type(key).__name__} is not ({exc})") from None
    if _format_has_objects(view.format):
        fmt = view.format.decode("ascii", "replace")
        PyBuffer_Release(view)
        raise TypeError(
            f"cache key of type {type(key).__name__} holds Python objects (format {fmt!r}); "
            "its bytes are pointers, not data")
    return 0


cdef inline int64_t _deployment_id(object deployment) except? -1:
    # Any int-like object (int, numpy integer); floats and strings are refused.
    if PyLong_Check(deployment):
        return deployment
    return PyNumber_Index(deployment)


cdef Py_ssize_t _estimate_nbytes(object output) except -1:
    cdef Py_ssize_t n
    if isinstance(output, (bytes, bytearray, str)):
        return len(output)
    if isinstance(output, (_ndarray, memoryview)):
        n = output.nbytes
        return n if n > 0 else 0
    if isinstance(output, (list, tuple, dict)):
        return _walk_nbytes(output)
    return OTHER_OUTPUT_NBYTES


cdef Py_ssize_t _walk_nbytes(object output) except -1:
    # A container output's charge (see CONTAINER_NBYTES), walked with a stack of its own: no recursion.
    cdef list stack = [output]
    cdef Py_ssize_t total = 0, nodes = 0, n
    cdef object o
    while stack:
        o = stack.pop()
        nodes += 1
        if nodes > MAX_WALK_NODES:
            return UNMEASURED_NBYTES
        if isinstance(o, (list, tuple)):
            total += CONTAINER_NBYTES + SLOT_NBYTES * len(o)
            stack.extend(o)
        elif isinstance(o, dict):
            total += CONTAINER_NBYTES + 2 * SLOT_NBYTES * len(o)
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (bytes, bytearray, str)):
            total += OTHER_OUTPUT_NBYTES + len(o)
        elif isinstance(o, (_ndarray, memoryview)):
            n = o.nbytes
            total += OTHER_OUTPUT_NBYTES + (n if n > 0 else 0)
        else:
            total += OTHER_OUTPUT_NBYTES
    return total


def _output_nbytes(output):
    """What the cache charges for ``output`` when fill is given no nbytes (for tests)."""
    return _estimate_nbytes(output)


def _key_hash(deployment, bytes key):
    """The unmasked 64-bit hash the cache uses for ``key`` (bytes) in ``deployment`` (for tests)."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(key)
    return _hash_bytes(p, PyBytes_GET_SIZE(key), _deployment_id(deployment))


cdef class PredictionCache:
    """Exact-match prediction cache with a byte budget and CLOCK eviction.

    See the module docstring for the policy and ``_cache.pyi`` for the API.
    """

    def __cinit__(self):
        self._entries = NULL
        self._index = NULL
        self._capacity = 0

    def __init__(self, Py_ssize_t budget_bytes, *, Py_ssize_t entry_overhead=96, hash_mask=-1):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        if entry_overhead < 0:
            raise ValueError(f"entry_overhead must be >= 0, got {entry_overhead}")
        if not PyLong_Check(hash_mask):
            raise TypeError(f"hash_mask must be an int, got {type(hash_mask).__name__}")
        self._mask = <uint64_t>(hash_mask & 0xFFFFFFFFFFFFFFFF)
        self._budget = budget_bytes
        self._overhead = entry_overhead
        self._next_token = 1
        self._reset(INITIAL_CAPACITY)

    def __dealloc__(self):
        free(self._entries)
        free(self._index)
        self._entries = NULL
        self._index = NULL

    # -- storage ---------------------------------------------------------------

    cdef int _reset(self, Py_ssize_t capacity) except -1:
        # Empty the cache with ``capacity`` slots. Callers keep the old lists alive until
        # the new state is complete, so no output's finalizer can see a half-built cache.
        cdef Entry* entries = <Entry*>malloc(capacity * sizeof(Entry))
        cdef IndexCell* index = <IndexCell*>malloc(2 * capacity * sizeof(IndexCell))
        cdef Py_ssize_t i
        if entries == NULL or index == NULL:
            free(entries)
            free(index)
            raise MemoryError()
        keys = [None] * capacity
        objs = [None] * capacity
        free(self._entries)
        free(self._index)
        self._entries = entries
        self._index = index
        self._capacity = capacity
        self._index_mask = 2 * capacity - 1
        for i in range(2 * capacity):
            index[i].slot = -1
        # Free list in slot order: slot 0 is taken first.
        for i in range(capacity):
            entries[i].state = SLOT_FREE
            entries[i].key = NULL
            entries[i].next_free = i + 1 if i + 1 < capacity else -1
        self._free_head = 0
        self._hand = 0
        self._count = 0
        self._ready = 0
        self._used = 0
        self._pending = {}
        self._keys = keys
        self._objs = objs
        return 0

    cdef int _grow(self) except -1:
        # Double the slots (only called when every slot is in use) and rebuild the index.
        cdef Py_ssize_t old = self._capacity, cap = 2 * old, i
        cdef Entry* entries
        cdef IndexCell* index
        if cap > (<Py_ssize_t>1 << 40):
            raise MemoryError("prediction cache cannot hold more entries")
        self._keys.extend([None] * old)
        self._objs.extend([None] * old)
        index = <IndexCell*>malloc(2 * cap * sizeof(IndexCell))
        if index == NULL:
            raise MemoryError()
        entries = <Entry*>realloc(self._entries, cap * sizeof(Entry))
        if entries == NULL:
            free(index)
            raise MemoryError()
        self._entries = entries
        for i in range(old, cap):
            entries[i].state = SLOT_FREE
            entries[i].key = NULL
            entries[i].next_free = i + 1 if i + 1 < cap else -1
        self._free_head = old
        self._capacity = cap
        free(self._index)
        self._index = index
        self._index_mask = 2 * cap - 1
        for i in range(2 * cap):
            index[i].slot = -1
        for i in range(old):
            if entries[i].state != SLOT_FREE:
                self._index_insert(entries[i].hash, i)
        return 0

    cdef Py_ssize_t _find(self, uint64_t h, int64_t deployment, const char* key, Py_ssize_t n) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self._index_mask)
        cdef IndexCell* cell
        cdef Entry* e
        while True:
            cell = &self._index[i]
            if cell.slot < 0:
                return -1
            if cell.hash == h:
                e = &self._entries[cell.slot]
                if e.deployment == deployment and e.key_len == n and (
                        n == 0 or memcmp(e.key, key, <size_t>n) == 0):
                    return cell.slot
            i = (i + 1) & self._index_mask

    cdef void _index_insert(self, uint64_t h, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self._index_mask)
        while self._index[i].slot >= 0:
            i = (i + 1) & self._index_mask
        self._index[i].hash = h
        self._index[i].slot = slot

    cdef void _index_remove(self, uint64_t h, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t m = self._index_mask
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>m), j, home
        cdef IndexCell* index = self._index
        while index[i].slot != slot:
            i = (i + 1) & m
        # Backward-shift deletion: move each following cell of the run into the hole
        # unless its home position lies cyclically in (hole, cell].
        j = i
        while True:
            j = (j + 1) & m
            if index[j].slot < 0:
                break
            home = <Py_ssize_t>(index[j].hash & <uint64_t>m)
            if (home <= i or home > j) if i <= j else (home <= i and home > j):
                index[i] = index[j]
                i = j
        index[i].slot = -1

    cdef Py_ssize_t _pending_slot(self, object token) except -2:
        # The slot reserved under ``token``, or -1 when the token is stale.
        cdef PyObject* found
        if not PyLong_Check(token):
            raise TypeError(f"token must be an int, got {type(token).__name__}")
        found = PyDict_GetItem(self._pending, token)
        if found == NULL:
            return -1
        return <Py_ssize_t><object>found

    cdef object _unlink(self, Py_ssize_t slot):
        # Remove the entry in ``slot`` and return its output or leader. The caller holds
        # that object until its own bookkeeping is done (its finalizer may run then).
        cdef Entry* e = &self._entries[slot]
        cdef object obj
        if e.state == SLOT_PENDING:
            del self._pending[e.token]
        else:
            self._ready -= 1
        self._index_remove(e.hash, slot)
        self._used -= e.charge
        self._count -= 1
        e.state = SLOT_FREE
        e.key = NULL
        e.next_free = self._free_head
        self._free_head = slot
        obj = self._objs[slot]
        self._objs[slot] = None
        self._keys[slot] = None      # always a bytes object: no finalizer
        return obj

    cdef int _evict(self) except -1:
        # Advance the CLOCK hand until the budget holds or no ready entry is left.
        cdef list dead = []
        cdef Py_ssize_t slot
        cdef Entry* e
        while self._used > self._budget and self._ready > 0:
            slot = self._hand
            self._hand = slot + 1 if slot + 1 < self._capacity else 0
            e = &self._entries[slot]
            if e.state != SLOT_READY:
                continue
            if e.ref:
                e.ref = 0
                continue
            dead.append(self._unlink(slot))
            self._evictions += 1
        return 0   # the evicted outputs are released here, after the loop

    # -- the API ---------------------------------------------------------------

    def lookup(self, object deployment, object key, object leader):
        """Look ``key`` up for ``deployment``: ``(HIT, output)``, ``(PENDING, leader)`` or ``(MISS, token)``."""
        cdef Py_buffer view
        cdef bint has_view = False
        cdef const char* p
        cdef Py_ssize_t n, slot
        cdef uint64_t h
        cdef Entry* e
        cdef int64_t tok
        cdef object token
        cdef int64_t dep = _deployment_id(deployment)
        if type(key) is not bytes:
            if isinstance(key, str):
                key = PyUnicode_AsUTF8String(key)
            else:
                _get_key_buffer(key, &view)
                has_view = True
        if has_view:
            p = <const char*>view.buf
            n = view.len
        else:
            p = PyBytes_AS_STRING(key)
            n = PyBytes_GET_SIZE(key)
        try:
            h = _hash_bytes(<const uint8_t*>p, n, dep) & self._mask
            self._lookups += 1
            slot = self._find(h, dep, p, n)
            if slot >= 0:
                e = &self._entries[slot]
                if e.state == SLOT_READY:
                    e.ref = 1
                    self._hits += 1
                    return (_HIT, self._objs[slot])
                self._joins += 1
                return (_PENDING, self._objs[slot])
            # MISS: reserve a pending entry. A bytes key is immutable, so it is kept as is;
            # anything else is copied.
            if has_view:
                key = PyBytes_FromStringAndSize(p, n)
            if self._free_head < 0:
                self._grow()
            tok = self._next_token
            token = tok
            slot = self._free_head
            self._pending[token] = slot          # the last step that can fail
            self._next_token = tok + 1
            self._misses += 1
            e = &self._entries[slot]
            self._free_head = e.next_free
            e.hash = h
            e.deployment = dep
            e.key = PyBytes_AS_STRING(key)
            e.key_len = n
            e.charge = n + self._overhead
            e.token = tok
            e.state = SLOT_PENDING
            e.ref = 0
            self._keys[slot] = key
            self._objs[slot] = leader
            self._index_insert(h, slot)
            self._count += 1
            self._used += e.charge
            if self._used > self._budget:
                self._evict()
            return (_MISS, token)
        finally:
            if has_view:
                PyBuffer_Release(&view)

    def fill(self, object token, object output, Py_ssize_t nbytes=-1):
        """Make the reservation ``token`` ready with ``output``; True if it is cached afterwards."""
        cdef Py_ssize_t slot, size
        cdef int64_t tok
        cdef Entry* e
        cdef object leader
        if nbytes < -1:
            raise ValueError(f"nbytes must be >= 0, or -1 to estimate it; got {nbytes}")
        size = _estimate_nbytes(output) if nbytes == -1 else nbytes
        slot = self._pending_slot(token)
        if slot < 0:
            self._fill_rejects += 1
            return False
        e = &self._entries[slot]
        if size > self._budget - e.charge:
            # This entry alone would exceed the budget: drop the reservation.
            leader = self._unlink(slot)
            self._fill_rejects += 1
            return False
        del self._pending[token]
        tok = e.token
        self._used += size
        e.charge += size
        e.state = SLOT_READY
        e.ref = 1
        self._ready += 1
        self._fills += 1
        leader = self._objs[slot]
        self._objs[slot] = output
        if self._used > self._budget:
            self._evict()
        e = &self._entries[slot]
        return e.state == SLOT_READY and e.token == tok

    def fail(self, object token):
        """Drop the reservation ``token``; return its leader, or None if the token is stale."""
        cdef Py_ssize_t slot = self._pending_slot(token)
        if slot < 0:
            return None
        self._fails += 1
        return self._unlink(slot)

    def peek_leader(self, object token):
        """The leader stored for the pending ``token``, or None if the token is stale."""
        cdef Py_ssize_t slot = self._pending_slot(token)
        if slot < 0:
            return None
        return self._objs[slot]

    def set_leader(self, object token, object leader):
        """Replace the leader stored for the pending ``token``; False if the token is stale."""
        cdef Py_ssize_t slot = self._pending_slot(token)
        cdef object old
        if slot < 0:
            return False
        old = self._objs[slot]
        self._objs[slot] = leader
        return True

    def invalidate(self, object deployment):
        """Remove every entry, ready or pending, of ``deployment``; return how many."""
        cdef list dead = []
        cdef Py_ssize_t slot
        cdef int64_t dep = _deployment_id(deployment)
        for slot in range(self._capacity):
            if self._entries[slot].state != SLOT_FREE and self._entries[slot].deployment == dep:
                dead.append(self._unlink(slot))
        self._invalidations += len(dead)
        return len(dead)

    def clear(self):
        """Remove every entry; pending tokens become stale. The counters are kept."""
        old = (self._keys, self._objs, self._pending)
        self._reset(INITIAL_CAPACITY)
        del old     # outputs and leaders are released only now

    def __len__(self):
        return self._count

    @property
    def budget_bytes(self):
        """The memory budget in bytes."""
        return self._budget

    @property
    def used_bytes(self):
        """Bytes charged by all entries (keys, outputs and per-entry overhead)."""
        return self._used

    def stats(self):
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
            "hit_ratio": <double>self._hits / <double>self._lookups if self._lookups else 0.0,
        }

    def __repr__(self):
        return (f"<PredictionCache entries={self._count} used_bytes={self._used} "
                f"budget_bytes={self._budget}>")
