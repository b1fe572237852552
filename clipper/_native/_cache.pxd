# Header of clipper._native._cache: the prediction cache of the query path.
# Pure-Python twin: cache_py.py. The policy is described in _cache.pyx.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint64_t

cdef enum SlotState:
    SLOT_FREE = 0        # unused; on the free list
    SLOT_PENDING = 1     # reserved by a MISS; holds the leader, waits for fill()
    SLOT_READY = 2       # holds an output; may be served and evicted

ctypedef struct Entry:
    uint64_t hash            # masked hash of (deployment, key bytes); also kept in the index
    int64_t deployment       # deployment id the entry belongs to
    const char* key          # the key bytes, owned by the bytes object in _keys[slot]
    Py_ssize_t key_len       # number of key bytes
    Py_ssize_t charge        # bytes this entry counts in _used (key + output + overhead)
    int64_t token            # reservation token (unique for the cache's lifetime)
    Py_ssize_t next_free     # next slot on the free list (FREE slots only), -1 at the end
    SlotState state          # FREE / PENDING / READY
    uint8_t ref              # CLOCK reference bit (READY only)

ctypedef struct IndexCell:
    uint64_t hash            # copy of the entry's hash, so probing rarely touches the entries
    Py_ssize_t slot          # entry slot, or -1 for an empty cell

@cython.final
cdef class PredictionCache:
    cdef Entry* _entries             # slot array; the CLOCK hand sweeps it in slot order
    cdef Py_ssize_t _capacity        # slots in _entries (a power of two)
    cdef IndexCell* _index           # open addressing, linear probing, backward-shift deletion
    cdef Py_ssize_t _index_mask      # index size - 1 (the index has 2 * _capacity cells)
    cdef list _keys                  # slot -> bytes object holding the key (None when FREE)
    cdef list _objs                  # slot -> leader (PENDING) or output (READY); None when FREE
    cdef dict _pending               # token -> slot for every PENDING entry
    cdef Py_ssize_t _free_head       # first free slot, -1 when all slots are in use
    cdef Py_ssize_t _hand            # CLOCK hand: the next slot to examine
    cdef Py_ssize_t _count           # entries in use (ready + pending)
    cdef Py_ssize_t _ready           # READY entries
    cdef Py_ssize_t _budget          # memory budget in bytes
    cdef Py_ssize_t _used            # bytes charged by all entries
    cdef Py_ssize_t _overhead        # bytes charged per entry on top of key and output
    cdef uint64_t _mask              # ANDed into every hash (tests force collisions with it)
    cdef int64_t _next_token         # the next reservation token
    # cumulative counters for stats(); clear() does not reset them
    cdef int64_t _lookups, _hits, _misses, _joins
    cdef int64_t _fills, _fill_rejects, _fails, _evictions, _invalidations

    cdef int _reset(self, Py_ssize_t capacity) except -1
    cdef int _grow(self) except -1
    cdef Py_ssize_t _find(self, uint64_t h, int64_t deployment, const char* key, Py_ssize_t n) noexcept
    cdef void _index_insert(self, uint64_t h, Py_ssize_t slot) noexcept
    cdef void _index_remove(self, uint64_t h, Py_ssize_t slot) noexcept
    cdef Py_ssize_t _pending_slot(self, object token) except -2
    cdef object _unlink(self, Py_ssize_t slot)
    cdef int _evict(self) except -1
