from libc.stdint cimport uint8_t, uint64_t

# Header of clipper._native._framing: the stream splitter of the msgpack port
# and the batch assembler. Pure-Python twin: framing_py.py.

cdef enum ReaderState:
    READ_HEADER = 0      # waiting for the 4-byte length prefix
    READ_BODY = 1        # collecting a body of self._need bytes
    SKIP_BODY = 2        # discarding the body of an oversized frame

cdef class FrameReader:
    cdef public Py_ssize_t max_frame_bytes     # the frame-size limit (the server may lower it as apps change)
    cdef bytearray _buf          # bytes of an incomplete header or body
    cdef ReaderState _state      # what the next bytes are
    cdef Py_ssize_t _need        # bytes the current piece needs in all
    cdef Py_ssize_t _fill        # READ_BODY: bytes of the body in _buf so far (_buf is allocated whole)
    cdef public Py_ssize_t skipped  # bytes of oversized frames skipped so far (their senders may be slowed)
    # Python properties (see _framing.pyi): buffered (len(_buf): the bytes an incomplete frame
    # holds) and mid_frame (_state != READ_HEADER or _buf not empty: a frame has begun).

    cdef void _set_state(self, ReaderState state, Py_ssize_t need)

cdef class IdSet:
    # The request ids awaiting their reply on one connection (duplicates are refused): a hash set of
    # uint64 with open addressing and linear probing; O(1), and allocation-free while it does not grow.
    cdef uint64_t* _keys         # the ids, by slot
    cdef uint8_t* _used          # 1 where _keys holds an id
    cdef Py_ssize_t _mask        # capacity - 1 (a power of two)
    cdef Py_ssize_t _len         # ids held

    cdef bint has(self, uint64_t key) noexcept nogil
    cpdef bint add(self, uint64_t key) except -1
    cpdef bint discard(self, uint64_t key)
    cdef int _resize(self, Py_ssize_t capacity) except -1

cpdef bytes pack_frame(object body)
cpdef bytes result_frame(uint64_t req_id, uint64_t query_id, object output_body, bint is_default,
                         object extra_body)
cpdef bytearray assemble_batch(list inputs, Py_ssize_t item_nbytes)
cpdef bytearray assemble_varlen(list inputs)
cpdef bytearray assemble_arrays(list inputs, int ndim)
