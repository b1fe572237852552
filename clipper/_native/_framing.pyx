# cython: language_level=3
"""Stream framing and batch assembly (native). See framing_py.py for the twin."""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcmp, memcpy, memset
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from cpython.float cimport PyFloat_Check, PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_Check, PyLong_AsDouble
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.pyport cimport PY_SSIZE_T_MAX
cimport numpy as cnp

cnp.import_array()

cdef enum:
    # array_input copies an input out of a read (instead of viewing it) when the read is more than this many
    # times the frame: a view would keep the whole read alive for as long as the query waits.
    _PIN_RATIO = 2
PIN_RATIO = _PIN_RATIO

cdef extern from "numpy/arrayobject.h":
    PyTypeObject PyArray_Type
    # (not declared by numpy's own .pxd) steals a reference to descr
    object PyArray_NewFromDescr(PyTypeObject* subtype, PyObject* descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, PyObject* obj)

cdef enum:
    HEADER_BYTES = 4


cdef inline uint32_t _read_be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef class FrameReader:
    """Split a byte stream into length-prefixed frames.

    ``feed(data)`` returns one item per frame completed by ``data``: the body
    (``bytes`` or a ``memoryview`` onto ``data``) or, for a frame longer than
    ``max_frame_bytes``, its declared length as an ``int``. Oversized bodies
    are skipped without buffering, so the stream stays in step.
    """

    def __cinit__(self, Py_ssize_t max_frame_bytes):
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._fill = 0
        self.skipped = 0
        self._set_state(READ_HEADER, HEADER_BYTES)

    cdef void _set_state(self, ReaderState state, Py_ssize_t need):
        self._state = state
        self._need = need

    @property
    def buffered(self):
        """Bytes held for an incomplete frame (its header or body so far): what the stream costs in memory."""
        return self._fill if self._state == READ_BODY else len(self._buf)

    @property
    def mid_frame(self):
        """True between a frame's first byte and its last (also while an oversized body is skipped)."""
        return self._state != READ_HEADER or len(self._buf) != 0

    def feed(self, data):
        cdef Py_buffer pybuf
        cdef list out = []
        cdef const uint8_t* p
        cdef Py_ssize_t n, pos = 0, take, avail, buffered
        cdef uint32_t length
        cdef object view = None
        cdef object chunk
        cdef uint8_t hdr[4]
        PyObject_GetBuffer(data, &pybuf, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>pybuf.buf
            n = pybuf.len
            while pos < n:
                if self._state == SKIP_BODY:
                    take = min(self._need, n - pos)
                    pos += take
                    self.skipped += take
                    self._need -= take
                    if self._need == 0:
                        self._set_state(READ_HEADER, HEADER_BYTES)
                    continue
                avail = n - pos
                buffered = len(self._buf)
                if self._state == READ_HEADER:
                    if buffered == 0 and avail >= HEADER_BYTES:
                        length = _read_be32(p + pos)
                        pos += HEADER_BYTES
                    else:
                        take = min(HEADER_BYTES - buffered, avail)
                        self._buf += PyBytes_FromStringAndSize(<const char*>(p + pos), take)
                        pos += take
                        if len(self._buf) < HEADER_BYTES:
                            break
                        length = _read_be32(<const uint8_t*>PyByteArray_AS_STRING(self._buf))
                        del self._buf[:]
                    if <Py_ssize_t>length > self.max_frame_bytes:
                        out.append(<Py_ssize_t>length)
                        self._set_state(SKIP_BODY, length)
                    elif length == 0:
                        out.append(b"")
                    else:
                        self._set_state(READ_BODY, length)
                    continue
                # READ_BODY
                if self._fill == 0 and avail >= self._need:
                    if view is None:
                        view = memoryview(data).cast("B")
                    out.append(view[pos:pos + self._need])
                    pos += self._need
                else:
                    # A body split over reads: one buffer of its whole length (pages the kernel gives as
                    # they are written), each byte copied once, and handed out as it is (no final copy).
                    if self._fill == 0:
                        self._buf = PyByteArray_FromStringAndSize(NULL, self._need)
                    take = min(self._need - self._fill, avail)
                    memcpy(PyByteArray_AS_STRING(self._buf) + self._fill, p + pos, take)
                    self._fill += take
                    pos += take
                    if self._fill < self._need:
                        break
                    out.append(self._buf)
                    self._buf = bytearray()
                    self._fill = 0
                self._set_state(READ_HEADER, HEADER_BYTES)
        finally:
            PyBuffer_Release(&pybuf)
        return out


# ------------------------------------------------------------------ request ids in flight
cdef inline Py_ssize_t _slot(uint64_t key, Py_ssize_t mask) noexcept nogil:
    return <Py_ssize_t>((key * <uint64_t>0x9E3779B97F4A7C15ULL) >> 32) & mask


cdef class IdSet:
    """The request ids awaiting their reply on one connection.

    ``add`` says whether the id was new (a duplicate is refused by the
    caller), ``discard`` removes it when its reply goes; both O(1) and
    allocation-free (the table doubles when three quarters full and never
    shrinks: its size follows max_pending_per_connection). The native
    ``refuse_run`` looks ids up in it without Python.
    """

    def __cinit__(self):
        self._keys = NULL
        self._used = NULL
        self._len = 0
        self._resize(16)

    def __dealloc__(self):
        PyMem_Free(self._keys)
        PyMem_Free(self._used)

    cdef int _resize(self, Py_ssize_t capacity) except -1:
        cdef uint64_t* old_keys = self._keys
        cdef uint8_t* old_used = self._used
        cdef Py_ssize_t old_cap = self._mask + 1 if old_keys != NULL else 0, i, j
        cdef uint64_t* keys = <uint64_t*>PyMem_Malloc(capacity * sizeof(uint64_t))
        cdef uint8_t* used = <uint8_t*>PyMem_Malloc(capacity)
        if keys == NULL or used == NULL:
            PyMem_Free(keys)
            PyMem_Free(used)
            raise MemoryError()
        memset(used, 0, capacity)
        self._keys, self._used, self._mask = keys, used, capacity - 1
        for i in range(old_cap):
            if old_used[i]:
                j = _slot(old_keys[i], self._mask)
                while used[j]:
                    j = (j + 1) & self._mask
                keys[j] = old_keys[i]
                used[j] = 1
        PyMem_Free(old_keys)
        PyMem_Free(old_used)
        return 0

    cdef bint has(self, uint64_t key) noexcept nogil:
        cdef Py_ssize_t j = _slot(key, self._mask)
        while self._used[j]:
            if self._keys[j] == key:
                return True
            j = (j + 1) & self._mask
        return False

    cpdef bint add(self, uint64_t key) except -1:
        """Add ``key``; False (and nothing changed) when it is held already."""
        cdef Py_ssize_t j
        if 4 * (self._len + 1) > 3 * (self._mask + 1):
            self._resize(2 * (self._mask + 1))
        j = _slot(key, self._mask)
        while self._used[j]:
            if self._keys[j] == key:
                return False
            j = (j + 1) & self._mask
        self._keys[j] = key
        self._used[j] = 1
        self._len += 1
        return True

    cpdef bint discard(self, uint64_t key):
        """Remove ``key`` if held (True when it was); the slots after it move back (no tombstones)."""
        cdef Py_ssize_t j = _slot(key, self._mask), k, home
        cdef Py_ssize_t mask = self._mask
        while self._used[j]:
            if self._keys[j] == key:
                break
            j = (j + 1) & mask
        else:
            return False
        # backward-shift deletion: move each later entry of the run into the hole when its home allows
        k = j
        while True:
            k = (k + 1) & mask
            if not self._used[k]:
                break
            home = _slot(self._keys[k], mask)
            # the entry at k may fill the hole at j unless its home lies cyclically in (j, k]
            if (j < k and (home <= j or home > k)) or (j > k and (home <= j and home > k)):
                self._keys[j] = self._keys[k]
                j = k
        self._used[j] = 0
        self._len -= 1
        return True

    def __contains__(self, key) -> bool:
        cdef uint64_t k
        if type(key) is not int:
            return False
        try:
            k = key  # (no allocation; an int below 0 or past 2**64 - 1 is no request id)
        except OverflowError:
            return False
        return self.has(k)

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        memset(self._used, 0, self._mask + 1)
        self._len = 0


cpdef bytes pack_frame(object body):
    """Return ``body`` prefixed with its 4-byte big-endian length (one copy)."""
    cdef Py_buffer pybuf
    cdef bytes out
    cdef char* q
    cdef Py_ssize_t n
    PyObject_GetBuffer(body, &pybuf, PyBUF_SIMPLE)
    try:
        n = pybuf.len
        if n > 0xFFFFFFFF:
            raise ValueError(f"frame body of {n} bytes exceeds the 4 GiB frame limit")
        out = PyBytes_FromStringAndSize(NULL, n + HEADER_BYTES)
        q = PyBytes_AS_STRING(out)
        q[0] = <char>((n >> 24) & 0xFF)
        q[1] = <char>((n >> 16) & 0xFF)
        q[2] = <char>((n >> 8) & 0xFF)
        q[3] = <char>(n & 0xFF)
        memcpy(q + HEADER_BYTES, pybuf.buf, n)
    finally:
        PyBuffer_Release(&pybuf)
    return out


cdef inline Py_ssize_t _put_uint(char* q, uint64_t v) noexcept nogil:
    # msgpack's shortest form of an unsigned integer (what msgpack-python writes)
    cdef int k, n
    if v < 0x80:
        q[0] = <char>v
        return 1
    if v <= 0xFF:
        q[0] = <char>0xcc
        n = 1
    elif v <= 0xFFFF:
        q[0] = <char>0xcd
        n = 2
    elif v <= <uint64_t>4294967295:
        q[0] = <char>0xce
        n = 4
    else:
        q[0] = <char>0xcf
        n = 8
    for k in range(n):
        q[1 + k] = <char>((v >> (8 * (n - 1 - k))) & 0xFF)
    return 1 + n


cdef inline void _put_be32(char* q, Py_ssize_t n) noexcept nogil:
    q[0] = <char>((n >> 24) & 0xFF)
    q[1] = <char>((n >> 16) & 0xFF)
    q[2] = <char>((n >> 8) & 0xFF)
    q[3] = <char>(n & 0xFF)


cdef inline Py_ssize_t _put_error(char* q, uint64_t req_id, const char* tail, Py_ssize_t tail_len) noexcept nogil:
    """Write the frame of ``[ERROR, req_id, <tail>]`` at ``q`` (room: HEADER_BYTES + 11 + tail_len);
    return its length."""
    cdef Py_ssize_t pos = HEADER_BYTES + 2
    q[HEADER_BYTES] = <char>0x95
    q[HEADER_BYTES + 1] = <char>0x7F
    pos += _put_uint(q + pos, req_id)
    memcpy(q + pos, tail, tail_len)
    pos += tail_len
    _put_be32(q, pos - HEADER_BYTES)
    return pos


cdef inline Py_ssize_t _put_result(char* q, uint64_t req_id, uint64_t query_id, const char* o, Py_ssize_t olen,
                                   bint is_default, const char* e, Py_ssize_t elen, bint has_extra) noexcept nogil:
    """Write the frame of ``[RESULT, req_id, query_id, <o>, is_default, <e>?]`` at ``q`` (room:
    HEADER_BYTES + 21 + olen + elen); return its length."""
    cdef Py_ssize_t pos = HEADER_BYTES
    q[pos] = <char>(0x96 if has_extra else 0x95)
    q[pos + 1] = <char>0x41
    pos += 2
    pos += _put_uint(q + pos, req_id)
    pos += _put_uint(q + pos, query_id)
    memcpy(q + pos, o, olen)
    pos += olen
    q[pos] = <char>(0xc3 if is_default else 0xc2)
    pos += 1
    if has_extra:
        memcpy(q + pos, e, elen)
        pos += elen
    _put_be32(q, pos - HEADER_BYTES)
    return pos


cpdef bytes result_frame(uint64_t req_id, uint64_t query_id, object output_body, bint is_default,
                         object extra_body):
    """The frame of ``[RESULT, req_id, query_id, output, is_default, extra?]``, in one allocation.

    ``output_body`` and ``extra_body`` are already msgpack-encoded (``extra_body``
    None: the message has five elements). Byte for byte what
    ``pack_frame(msgpack.packb([65, req_id, query_id, output, is_default, extra]))`` gives.
    """
    cdef Py_buffer out_buf, extra_buf
    cdef bint has_extra = extra_body is not None
    cdef Py_ssize_t n, pos
    cdef bytes frame
    PyObject_GetBuffer(output_body, &out_buf, PyBUF_SIMPLE)
    try:
        if has_extra:
            PyObject_GetBuffer(extra_body, &extra_buf, PyBUF_SIMPLE)
        try:
            # array header + type + two uints (9 bytes each at most) + output + bool + extra
            n = 2 + 9 + 9 + out_buf.len + 1 + (extra_buf.len if has_extra else 0)
            frame = PyBytes_FromStringAndSize(NULL, n + HEADER_BYTES)
            pos = _put_result(PyBytes_AS_STRING(frame), req_id, query_id, <const char*>out_buf.buf, out_buf.len,
                              is_default, <const char*>extra_buf.buf if has_extra else NULL,
                              extra_buf.len if has_extra else 0, has_extra)
        finally:
            if has_extra:
                PyBuffer_Release(&extra_buf)
    finally:
        PyBuffer_Release(&out_buf)
    return frame[:pos] if pos < PyBytes_GET_SIZE(frame) else frame


cpdef bytes error_frame(uint64_t req_id, object tail):
    """The frame of ``[ERROR, req_id, code, name, message]`` from ``tail``: the msgpack encodings of
    code, name and message, concatenated (a refusal's words, encoded once). Byte for byte what
    ``pack_frame(msgpack.packb([127, req_id, code, name, message]))`` gives."""
    cdef Py_buffer tail_buf
    cdef Py_ssize_t n, pos
    cdef bytes frame
    cdef char* q
    PyObject_GetBuffer(tail, &tail_buf, PyBUF_SIMPLE)
    try:
        frame = PyBytes_FromStringAndSize(NULL, HEADER_BYTES + 2 + 9 + tail_buf.len)
        q = PyBytes_AS_STRING(frame)
        pos = _put_error(q, req_id, <const char*>tail_buf.buf, tail_buf.len)
    finally:
        PyBuffer_Release(&tail_buf)
    return frame[:pos] if pos < PyBytes_GET_SIZE(frame) else frame


cpdef bytearray assemble_batch(list inputs, Py_ssize_t item_nbytes):
    """Copy each input's bytes once into one contiguous buffer.

    Every input must expose exactly ``item_nbytes`` bytes through the buffer
    protocol (a C-contiguous numpy array or bytes).
    """
    cdef Py_ssize_t count = len(inputs), i
    cdef bytearray out = PyByteArray_FromStringAndSize(NULL, item_nbytes * count)
    cdef char* q = PyByteArray_AS_STRING(out)
    cdef Py_buffer pybuf
    for i in range(count):
        PyObject_GetBuffer(inputs[i], &pybuf, PyBUF_SIMPLE)
        try:
            if pybuf.len != item_nbytes:
                raise ValueError(
                    f"input of {pybuf.len} bytes in a batch of {item_nbytes}-byte items")
            memcpy(q + i * item_nbytes, pybuf.buf, item_nbytes)
        finally:
            PyBuffer_Release(&pybuf)
    return out


cdef inline void _store_le64(char* p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <char>((v >> (8 * k)) & 0xFF)


cpdef bytearray assemble_varlen(list inputs):
    """Variable-size inputs (bytes or str) as one buffer: offsets, then data.

    The buffer starts with ``len(inputs) + 1`` little-endian uint64 offsets
    into the data that follows (the first is 0, the last the data's length);
    item ``i`` is ``data[offsets[i]:offsets[i + 1]]``. A str travels as its
    UTF-8 bytes. Each input is copied once.
    """
    cdef Py_ssize_t count = len(inputs), i, n, total = 0
    cdef Py_ssize_t head = (count + 1) * 8
    cdef object x
    cdef const char* src
    for i in range(count):
        x = inputs[i]
        if type(x) is bytes:
            total += PyBytes_GET_SIZE(x)
        elif type(x) is str:
            PyUnicode_AsUTF8AndSize(x, &n)
            total += n
        else:
            raise TypeError(f"a variable-size batch holds bytes or str, not {type(x).__name__}")
    cdef bytearray out = PyByteArray_FromStringAndSize(NULL, head + total)
    cdef char* base = PyByteArray_AS_STRING(out)
    cdef char* data = base + head
    cdef uint64_t pos = 0
    _store_le64(base, 0)
    for i in range(count):
        x = inputs[i]
        if type(x) is bytes:
            src = PyBytes_AS_STRING(x)
            n = PyBytes_GET_SIZE(x)
        else:
            src = PyUnicode_AsUTF8AndSize(x, &n)
        memcpy(data + pos, src, n)
        pos += n
        _store_le64(base + (i + 1) * 8, pos)
    return out


cpdef bytearray assemble_arrays(list inputs, int ndim):
    """Numpy arrays of one dtype and ``ndim`` dimensions but any shapes, as one buffer (the ``"vl"``
    encoding of arrays, clipper/rpc/messages.py): ``len(inputs) + 1`` little-endian uint64 byte
    offsets into the data, then each item's shape (``ndim`` little-endian uint64 each), then the
    data, each item in C order. Each item is copied once (a non-contiguous one twice)."""
    cdef Py_ssize_t count = len(inputs), i, k, total = 0
    cdef Py_ssize_t head = (count + 1) * 8 + count * ndim * 8
    cdef cnp.ndarray x
    cdef bint copied = False
    for i in range(count):
        x = inputs[i]
        if cnp.PyArray_NDIM(x) != ndim:
            raise ValueError(f"item {i} of an array batch has {cnp.PyArray_NDIM(x)} dimensions; expected {ndim}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(x):  # (inputs are contiguous as checked; a caller's may not be)
            if not copied:
                inputs = list(inputs)  # (the caller's list is left as it was)
                copied = True
            x = cnp.PyArray_GETCONTIGUOUS(x)
            inputs[i] = x
        total += cnp.PyArray_NBYTES(x)
    cdef bytearray out = PyByteArray_FromStringAndSize(NULL, head + total)
    cdef char* base = PyByteArray_AS_STRING(out)
    cdef char* shapes = base + (count + 1) * 8
    cdef char* data = base + head
    cdef uint64_t pos = 0
    cdef cnp.npy_intp* dims
    _store_le64(base, 0)
    for i in range(count):
        x = inputs[i]
        dims = cnp.PyArray_DIMS(x)
        for k in range(ndim):
            _store_le64(shapes + (i * ndim + k) * 8, <uint64_t>dims[k])
        memcpy(data + pos, cnp.PyArray_DATA(x), cnp.PyArray_NBYTES(x))
        pos += cnp.PyArray_NBYTES(x)
        _store_le64(base + (i + 1) * 8, pos)
    return out


# ------------------------------------------------------------------ nested-list inputs, before decoding
cdef enum:
    MAX_NEST_DIMS = 32  # a list input nests at most this many arrays (EXT_NDARRAY's MAX_NDIM)
    _SKIP_DEPTH = 64  # a map or array inside a value nested deeper than this: the decoder judges the frame
    # check_nested's verdicts (the error codes of docs/protocol.md section 4, in the order they are judged)
    NEST_UNDECIDED = 0  # truncated or not msgpack: the full decoder judges it
    NEST_INVALID = 201  # too deep (detail 0) or ragged (detail 1)
    NEST_TOO_LARGE = 205  # detail: the number of values
    NEST_DTYPE = 203  # detail: the msgpack type byte of the first value that is not a number (0xcb: a float)
    NEST_SHAPE = 204  # detail: the list's shape (a tuple)


cdef struct _Scan:
    Py_ssize_t values         # numbers (and other values) seen
    Py_ssize_t dims[MAX_NEST_DIMS]  # the length of the first array met at each depth
    int ndims                 # depths whose length is known
    int leaf_depth            # the depth values were first met at (-1: none yet)
    int max_arr_depth         # the deepest array (-1: none)
    int nonnum                # the type byte of the first value that is not a number (-1: none)
    bint has_float
    bint ragged
    bint too_deep
    bint undecided


cdef inline uint32_t _be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | <uint32_t>p[1]


cdef Py_ssize_t _skip(const uint8_t* p, Py_ssize_t n, Py_ssize_t pos, int depth) noexcept nogil:
    """The position after the msgpack value at ``pos`` (a value inside a list input that is not a
    number: skipped whole); -1 when truncated, not msgpack, or nested past _SKIP_DEPTH."""
    cdef uint8_t b
    cdef Py_ssize_t length = 0, size = 0, i, items = 0
    if pos >= n or depth > _SKIP_DEPTH:
        return -1
    b = p[pos]
    if b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3:
        return pos + 1
    if 0xA0 <= b <= 0xBF:
        size = b & 0x1F
        pos += 1
    elif 0x80 <= b <= 0x8F:
        items = 2 * (b & 0x0F)
        pos += 1
    elif 0x90 <= b <= 0x9F:
        items = b & 0x0F
        pos += 1
    elif b == 0xCC or b == 0xD0:
        size = 1
        pos += 1
    elif b == 0xCD or b == 0xD1:
        size = 2
        pos += 1
    elif b == 0xCE or b == 0xD2 or b == 0xCA:
        size = 4
        pos += 1
    elif b == 0xCF or b == 0xD3 or b == 0xCB:
        size = 8
        pos += 1
    elif b == 0xD9 or b == 0xC4:
        if pos + 2 > n:
            return -1
        size = p[pos + 1]
        pos += 2
    elif b == 0xDA or b == 0xC5:
        if pos + 3 > n:
            return -1
        size = _be16(p + pos + 1)
        pos += 3
    elif b == 0xDB or b == 0xC6:
        if pos + 5 > n:
            return -1
        size = _read_be32(p + pos + 1)
        pos += 5
    elif 0xD4 <= b <= 0xD8:  # fixext: type byte, then 1..16 bytes
        size = 1 + (1 << (b - 0xD4))
        pos += 1
    elif b == 0xC7:
        if pos + 2 > n:
            return -1
        size = 1 + p[pos + 1]
        pos += 2
    elif b == 0xC8:
        if pos + 3 > n:
            return -1
        size = 1 + _be16(p + pos + 1)
        pos += 3
    elif b == 0xC9:
        if pos + 5 > n:
            return -1
        size = 1 + <Py_ssize_t>_read_be32(p + pos + 1)
        pos += 5
    elif b == 0xDC or b == 0xDE:
        if pos + 3 > n:
            return -1
        items = _be16(p + pos + 1) * (2 if b == 0xDE else 1)
        pos += 3
    elif b == 0xDD or b == 0xDF:
        if pos + 5 > n:
            return -1
        items = <Py_ssize_t>_read_be32(p + pos + 1) * (2 if b == 0xDF else 1)
        pos += 5
    else:
        return -1  # 0xc1: never used
    if size > n - pos:
        return -1
    pos += size
    for i in range(items):
        pos = _skip(p, n, pos, depth + 1)
        if pos < 0:
            return -1
    return pos


cdef Py_ssize_t _scan(const uint8_t* p, Py_ssize_t n, Py_ssize_t pos, int depth, _Scan* s) noexcept nogil:
    """Walk the list input's value at ``pos`` (at array depth ``depth``) into ``s``; the position after it,
    or -1 when the walk stops (too deep, or undecidable)."""
    cdef uint8_t b
    cdef Py_ssize_t length, i
    if pos >= n:
        s.undecided = True
        return -1
    b = p[pos]
    if 0x90 <= b <= 0x9F or b == 0xDC or b == 0xDD:
        if depth >= MAX_NEST_DIMS:
            s.too_deep = True
            return -1
        if b == 0xDC:
            if pos + 3 > n:
                s.undecided = True
                return -1
            length = _be16(p + pos + 1)
            pos += 3
        elif b == 0xDD:
            if pos + 5 > n:
                s.undecided = True
                return -1
            length = _read_be32(p + pos + 1)
            pos += 5
        else:
            length = b & 0x0F
            pos += 1
        if depth < s.ndims:
            if length != s.dims[depth]:
                s.ragged = True
        else:  # the first array at this depth (depths are met in order along the first path)
            s.dims[depth] = length
            s.ndims = depth + 1
        if depth > s.max_arr_depth:
            s.max_arr_depth = depth
        for i in range(length):
            pos = _scan(p, n, pos, depth + 1, s)
            if pos < 0:
                return -1
        return pos
    # a value
    if s.leaf_depth < 0:
        s.leaf_depth = depth
    elif s.leaf_depth != depth:
        s.ragged = True
    s.values += 1
    if b <= 0x7F or b >= 0xE0 or b == 0xC2 or b == 0xC3:
        return pos + 1
    if b == 0xCA or b == 0xCB:
        s.has_float = True
        pos += 5 if b == 0xCA else 9
    elif b == 0xCC or b == 0xD0:
        pos += 2
    elif b == 0xCD or b == 0xD1:
        pos += 3
    elif b == 0xCE or b == 0xD2:
        pos += 5
    elif b == 0xCF or b == 0xD3:
        pos += 9
    else:
        if s.nonnum < 0:  # (the type's first byte: str 0xa0, bin 0xc4, nil 0xc0, map 0x80, ext 0xc7)
            if 0xA0 <= b <= 0xBF or 0xD9 <= b <= 0xDB:
                s.nonnum = 0xA0
            elif 0xC4 <= b <= 0xC6:
                s.nonnum = 0xC4
            elif 0x80 <= b <= 0x8F or b == 0xDE or b == 0xDF:
                s.nonnum = 0x80
            elif b == 0xC0:
                s.nonnum = 0xC0
            else:
                s.nonnum = 0xC7
        pos = _skip(p, n, pos, depth)
        if pos < 0:
            s.undecided = True
            return -1
        return pos
    if pos > n:
        s.undecided = True
        return -1
    return pos


cpdef object check_nested(object body, Py_ssize_t offset, tuple shape, Py_ssize_t itemsize, Py_ssize_t max_bytes,
                          bint int_app):
    """Judge the list input (a msgpack array) at ``offset`` of ``body`` without building it, by the
    rules of docs/protocol.md section 4 in their order.

    ``shape`` is the application's (-1: any length), ``itemsize`` its
    dtype's, ``max_bytes`` max_input_bytes, ``int_app`` whether its dtype
    takes no floats (integers, bools). Returns None when the list passes
    (the decoder converts it; values out of range are judged then), else
    ``(verdict, detail)``: 201 nested deeper than 32 arrays (detail 0) or
    ragged (1); 205 too large (detail: the number of values); 203 a value
    that is not a number, or a float for ``int_app`` (detail: its msgpack
    type byte); 204 another shape (detail: the list's shape); 0 undecidable
    here (truncated, not msgpack): the decoder judges the frame.
    """
    cdef Py_buffer pybuf
    cdef _Scan s
    cdef Py_ssize_t end, want
    cdef int ndim = len(shape), i, list_ndim
    s.values = 0
    s.ndims = 0
    s.leaf_depth = -1
    s.max_arr_depth = -1
    s.nonnum = -1
    s.has_float = s.ragged = s.too_deep = s.undecided = False
    PyObject_GetBuffer(body, &pybuf, PyBUF_SIMPLE)
    try:
        end = _scan(<const uint8_t*>pybuf.buf, pybuf.len, offset, 0, &s)
    finally:
        PyBuffer_Release(&pybuf)
    if s.too_deep:
        return (NEST_INVALID, 0)
    if end < 0:
        return (NEST_UNDECIDED, 0)
    if s.values > max_bytes // itemsize:
        return (NEST_TOO_LARGE, s.values)
    if s.leaf_depth >= 0 and s.max_arr_depth >= s.leaf_depth:
        s.ragged = True  # an array where another branch holds values
    if s.ragged:
        return (NEST_INVALID, 1)
    if s.nonnum >= 0:
        return (NEST_DTYPE, s.nonnum)
    if s.has_float and int_app:
        return (NEST_DTYPE, 0xCB)
    list_ndim = s.leaf_depth if s.leaf_depth >= 0 else s.ndims
    if list_ndim != ndim:
        return (NEST_SHAPE, tuple([s.dims[i] for i in range(list_ndim)]))
    for i in range(ndim):
        want = shape[i]
        if want != -1 and want != s.dims[i]:
            return (NEST_SHAPE, tuple([s.dims[i] for i in range(list_ndim)]))
    return None


cdef inline Py_ssize_t _head(const uint8_t* p, Py_ssize_t n, uint64_t* req_id, Py_ssize_t* slen) noexcept nogil:
    """Parse ``[kind, id, app, ...]``'s head: kind 1 or 2 (PREDICT, FEEDBACK), an unsigned integer id
    and a str app name; on success set ``req_id`` and ``slen`` (the name's length) and return where
    the name starts, with at least one byte after it; -1 for any other frame."""
    cdef Py_ssize_t pos = 2, k, i
    cdef uint8_t b
    cdef uint64_t v = 0
    if n < 4 or not (0x94 <= p[0] <= 0x96) or not (p[1] == 1 or p[1] == 2):
        return -1
    b = p[pos]
    if b <= 0x7F:
        v = b
        pos += 1
    elif 0xCC <= b <= 0xCF:
        k = 1 << (b - 0xCC)
        if pos + 1 + k > n:
            return -1
        for i in range(k):
            v = (v << 8) | p[pos + 1 + i]
        pos += 1 + k
    else:
        return -1
    if pos >= n:
        return -1
    b = p[pos]
    if 0xA0 <= b <= 0xBF:
        slen[0] = b & 0x1F
        pos += 1
    elif b == 0xD9 and pos + 2 <= n:
        slen[0] = p[pos + 1]
        pos += 2
    elif b == 0xDA and pos + 3 <= n:
        slen[0] = _be16(p + pos + 1)
        pos += 3
    else:
        return -1
    if slen[0] > 4096 or pos + slen[0] >= n:
        return -1
    req_id[0] = v
    return pos


cpdef object request_head(object body):
    """The head of a PREDICT or FEEDBACK frame, read from its bytes without decoding the rest.

    Returns ``(kind, req_id, app, offset, is_list)`` for ``[kind, id, app,
    input, ...]`` with ``kind`` 1 or 2, an unsigned integer id and a str app
    of at most 4 KiB: ``offset`` is where the input starts, ``is_list``
    whether it is a msgpack array (a nested list, which
    :func:`check_nested` can judge). None for every other frame.
    """
    cdef Py_buffer pybuf
    cdef const uint8_t* p
    cdef Py_ssize_t pos, slen = 0
    cdef uint8_t b
    cdef uint64_t req_id = 0
    PyObject_GetBuffer(body, &pybuf, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>pybuf.buf
        pos = _head(p, pybuf.len, &req_id, &slen)
        if pos < 0:
            return None
        b = p[pos + slen]
        try:
            app = (<const char*>(p + pos))[:slen].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return (p[1], req_id, app, pos + slen, 0x90 <= b <= 0x9F or b == 0xDC or b == 0xDD)
    finally:
        PyBuffer_Release(&pybuf)


cdef Py_ssize_t _run_head(object item, const char* app, Py_ssize_t alen, Py_ssize_t max_body,
                          uint64_t* req_id) except -2:
    """A run's test of one item (refuse_run, take_run): a PREDICT frame body ``[1, id, app, ...]`` of at
    most ``max_body`` bytes with an unsigned integer id and exactly the application name ``app``. Returns
    where its input starts (and sets ``req_id``); -1 for anything else, an oversized frame's int too."""
    cdef Py_buffer pybuf
    cdef const uint8_t* p
    cdef Py_ssize_t n, pos, slen = 0
    if type(item) is int:
        return -1
    PyObject_GetBuffer(item, &pybuf, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>pybuf.buf
        n = pybuf.len
        if n > max_body or n < 4 or p[1] != 1:
            return -1
        pos = _head(p, n, req_id, &slen)
        if pos < 0 or slen != alen or pos + slen >= n or memcmp(p + pos, app, alen) != 0:
            return -1
        return pos + slen
    finally:
        PyBuffer_Release(&pybuf)


cpdef Py_ssize_t refuse_run(list items, Py_ssize_t start, bytes app, Py_ssize_t max_body, object tail,
                            bytearray out, IdSet inflight=None, Py_ssize_t max_out=-1):
    """Refuse a run of PREDICT frames for one application in one pass (admission's fast path).

    From ``items[start]`` on, while an item is a PREDICT frame body ``[1, id,
    app, ...]`` with an unsigned integer id, exactly the application name
    ``app`` (its UTF-8 bytes) and at most ``max_body`` bytes, appends to
    ``out`` the frame :func:`error_frame` makes for its id and ``tail``.
    Stops at the first item that is anything else (another kind, another
    application, a malformed head, an oversized frame's int, an id that
    ``inflight`` holds: a duplicate, refused as such by the caller), or once
    ``out`` holds ``max_out`` bytes or more (a negative ``max_out``: no
    bound; the caller writes that much before it reads on), and returns its
    index: the caller takes that one the whole way.
    """
    if items is None or app is None or out is None:
        raise TypeError("refuse_run: items, app and out must not be None")
    return _answer_run(items, start, app, max_body, out, inflight, tail, None, False, 0, max_out)


cpdef Py_ssize_t default_run(list items, Py_ssize_t start, bytes app, Py_ssize_t max_body, uint64_t first_qid,
                             object output_body, object extra_body, bytearray out, IdSet inflight=None,
                             Py_ssize_t max_out=-1):
    """Answer a run of PREDICT frames for one application with its default output in one pass (admission's
    fast path for an application whose refusals are default outputs).

    The frames it takes are those :func:`refuse_run` takes; for each it
    appends to ``out`` the frame :func:`result_frame` makes of its id, a query
    id counting up from ``first_qid``, ``output_body``, ``is_default`` true and
    ``extra_body`` (stopping, as refuse_run does, once ``out`` holds ``max_out``
    bytes). Returns the index of the first item it leaves.
    """
    if items is None or app is None or out is None or output_body is None:
        raise TypeError("default_run: items, app, output_body and out must not be None")
    return _answer_run(items, start, app, max_body, out, inflight, output_body, extra_body, True, first_qid,
                       max_out)


cdef Py_ssize_t _answer_run(list items, Py_ssize_t start, bytes app, Py_ssize_t max_body, bytearray out,
                            IdSet inflight, object body1, object body2, bint results, uint64_t first_qid,
                            Py_ssize_t max_out) except -1:
    """refuse_run (ERROR frames of the tail ``body1``) and default_run (``results``: RESULT frames of the
    output ``body1`` and the extra ``body2``, query ids from ``first_qid``)."""
    cdef Py_ssize_t i = start, n_items, n, alen, base, room
    cdef Py_buffer b1, b2
    cdef bint has2 = body2 is not None
    cdef const char* a
    cdef uint64_t req_id = 0
    cdef uint64_t qid = first_qid
    n_items = len(items)
    alen = PyBytes_GET_SIZE(app)
    a = PyBytes_AS_STRING(app)
    if i < 0:
        i = 0
    PyObject_GetBuffer(body1, &b1, PyBUF_SIMPLE)
    try:
        if has2:
            PyObject_GetBuffer(body2, &b2, PyBUF_SIMPLE)
        try:
            room = HEADER_BYTES + 21 + b1.len + (b2.len if has2 else 0)
            while i < n_items:
                if max_out >= 0 and len(out) >= max_out:
                    break
                if _run_head(items[i], a, alen, max_body, &req_id) < 0:
                    break
                if inflight is not None and inflight.has(req_id):
                    break
                base = len(out)
                PyByteArray_Resize(out, base + room)
                if results:
                    n = _put_result(PyByteArray_AS_STRING(out) + base, req_id, qid, <const char*>b1.buf, b1.len,
                                    True, <const char*>b2.buf if has2 else NULL, b2.len if has2 else 0, has2)
                    qid += 1
                else:
                    n = _put_error(PyByteArray_AS_STRING(out) + base, req_id, <const char*>b1.buf, b1.len)
                PyByteArray_Resize(out, base + n)
                i += 1
        finally:
            if has2:
                PyBuffer_Release(&b2)
    finally:
        PyBuffer_Release(&b1)
    return i


cpdef object array_input(object body, Py_ssize_t offset, bytes ext_head, cnp.dtype dtype, tuple shape):
    """The input of a PREDICT frame as a read-only ndarray over the frame's own bytes (no copy, nothing
    decoded), or None for the full decoder to judge.

    ``body`` must be ``[1, id, app, x]`` (exactly four items), ``offset``
    where ``x`` starts (:func:`request_head`), and ``x`` an ``EXT_NDARRAY``
    whose encoding begins with ``ext_head`` (``wire.ndarray_ext_head`` of
    ``dtype`` and ``shape``: the application's) and whose data, of
    ``dtype.itemsize * prod(shape)`` bytes, ends the frame. The array keeps
    ``body`` alive (a bytearray is locked against resizing by a memoryview) --
    unless ``body`` is a slice of a read more than ``PIN_RATIO`` times its
    size: then the data is copied into an array of its own, so that a queued
    query never holds a whole read of other frames in memory (the frontend's
    byte budgets count the input, not the read).
    """
    cdef Py_buffer pybuf
    cdef Py_ssize_t hlen = PyBytes_GET_SIZE(ext_head), ndim = len(shape), nbytes, i, d
    cdef cnp.npy_intp dims[32]
    cdef const uint8_t* p
    cdef object base = body
    cdef cnp.ndarray arr
    cdef bint copy = False
    if ndim > 32 or offset < 0:
        return None
    if type(body) is bytearray:
        base = memoryview(body)  # the view's export keeps the bytearray from being resized under the array
    elif type(body) is memoryview and len((<object>body).obj) > _PIN_RATIO * len(body):
        copy = True  # a slice of a much larger read: do not pin the read
    PyObject_GetBuffer(base, &pybuf, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>pybuf.buf
        nbytes = dtype.itemsize
        for i in range(ndim):
            d = shape[i]
            if d < 0 or (d and nbytes > PY_SSIZE_T_MAX // d):  # (a zero dimension later may end at 0)
                return None
            dims[i] = d
            nbytes *= d
        if (pybuf.len < 1 or p[0] != 0x94 or offset > pybuf.len - hlen - nbytes
                or offset + hlen + nbytes != pybuf.len
                or memcmp(p + offset, PyBytes_AS_STRING(ext_head), hlen) != 0):
            return None
        # PyArray_NewFromDescr steals a reference to the dtype; flags 0: read-only (alignment and
        # contiguity are computed by numpy from the pointer and the default strides)
        Py_INCREF(dtype)
        if copy:
            arr = PyArray_NewFromDescr(&PyArray_Type, <PyObject*>dtype, <int>ndim, dims, NULL, NULL, 0, NULL)
            memcpy(cnp.PyArray_DATA(arr), p + offset + hlen, nbytes)
            cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)  # read-only, as the view would be
            return arr
        arr = PyArray_NewFromDescr(&PyArray_Type, <PyObject*>dtype, <int>ndim, dims, NULL,
                                   <void*>(p + offset + hlen), 0, NULL)
    finally:
        PyBuffer_Release(&pybuf)
    cnp.set_array_base(arr, base)
    return arr


cpdef object floats_to_array(list items, cnp.dtype dtype):
    """A flat list of Python floats and ints (bools are ints) as a new 1-D array of ``dtype``, float32 or
    float64, each number converted as numpy converts it (to double, then to the dtype); None for any other
    dtype, any other item, or an int too large for a double: the caller's full conversion judges those.
    The REST port's (and a msgpack list input's) conversion, without numpy's type inference."""
    cdef Py_ssize_t n = len(items), i
    cdef cnp.npy_intp dims[1]
    cdef int tn = dtype.type_num
    cdef cnp.ndarray arr
    cdef float* f32
    cdef double* f64
    cdef double d
    cdef object v
    if tn != cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE:
        return None
    dims[0] = n
    arr = cnp.PyArray_EMPTY(1, dims, tn, 0)
    f32 = <float*>cnp.PyArray_DATA(arr)
    f64 = <double*>cnp.PyArray_DATA(arr)
    for i in range(n):
        v = items[i]
        if PyFloat_Check(v):
            d = PyFloat_AS_DOUBLE(v)
        elif PyLong_Check(v):
            try:
                d = PyLong_AsDouble(v)
            except OverflowError:
                return None
        else:
            return None
        if tn == cnp.NPY_FLOAT:
            f32[i] = <float>d
        else:
            f64[i] = d
    return arr


cdef extern from "stdlib.h":
    double strtod(const char* s, char** end) nogil

cdef extern from "math.h":
    bint isfinite(double x) nogil


cdef inline Py_ssize_t _json_ws(const char* s, Py_ssize_t p, Py_ssize_t end) noexcept nogil:
    while p < end and (s[p] == 32 or s[p] == 9 or s[p] == 10 or s[p] == 13):  # JSON's four: space, \t, \n, \r
        p += 1
    return p


cdef inline bint _is_digit(char c) noexcept nogil:
    return 48 <= c <= 57


# 10**0 .. 10**22: every one exact in a double (Clinger's fast path below)
cdef double _POW10[23]
for _k in range(23):
    _POW10[_k] = 10.0 ** _k


cpdef object json_vector(object raw, cnp.dtype dtype, Py_ssize_t n):
    """A REST body that is exactly ``{"input": [n JSON numbers]}`` (JSON whitespace anywhere between
    tokens) parsed straight into a new 1-D array of ``dtype`` (float32 or float64), each number as
    orjson and :func:`floats_to_array` together convert it: to the nearest double, then to the dtype.
    None for anything else, left to the full JSON decoder: another dtype, another key or a second one,
    an escape in the key, a count other than ``n`` (or ``n`` 0), a number the strict JSON grammar
    refuses, an integer of more than 15 digits, or one whose double is not finite. No Python object is
    made per number (orjson makes a float for each, a fifth of a REST request's time)."""
    cdef Py_ssize_t end, p, t0, count = 0, digits
    cdef const char* s
    cdef char* stop
    cdef int tn = dtype.type_num
    cdef bint neg, intlike, exact
    cdef long long iv, e10, ev
    cdef bint eneg
    cdef uint64_t m
    cdef double d
    cdef cnp.npy_intp dims[1]
    cdef cnp.ndarray arr
    cdef float* f32
    cdef double* f64
    if type(raw) is not bytes or n <= 0 or (tn != cnp.NPY_FLOAT and tn != cnp.NPY_DOUBLE):
        return None
    s = PyBytes_AS_STRING(raw)
    end = PyBytes_GET_SIZE(raw)
    p = _json_ws(s, 0, end)
    if p >= end or s[p] != b'{':
        return None
    p = _json_ws(s, p + 1, end)
    if end - p < 7 or memcmp(s + p, b'"input"', 7) != 0:
        return None
    p = _json_ws(s, p + 7, end)
    if p >= end or s[p] != b':':
        return None
    p = _json_ws(s, p + 1, end)
    if p >= end or s[p] != b'[':
        return None
    p = _json_ws(s, p + 1, end)
    dims[0] = n
    arr = cnp.PyArray_EMPTY(1, dims, tn, 0)
    f32 = <float*>cnp.PyArray_DATA(arr)
    f64 = <double*>cnp.PyArray_DATA(arr)
    while True:
        if count >= n:
            return None
        # -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
        t0 = p
        neg = p < end and s[p] == b'-'
        if neg:
            p += 1
        if p >= end or not _is_digit(s[p]):
            return None
        # m: the digits as one integer while it stays exact (below 2**53); e10: the power of ten it is
        # scaled by. Then Clinger's fast path: m and 10**|e10| (|e10| <= 22) are both exact doubles, so
        # one multiplication or division rounds correctly, as strtod would; anything else goes to strtod.
        iv = 0
        m = 0
        exact = True
        e10 = 0
        digits = 0
        if s[p] == b'0':
            p += 1
            digits = 1
        else:
            while p < end and _is_digit(s[p]):
                if digits < 18:
                    iv = iv * 10 + (s[p] - 48)
                digits += 1
                p += 1
        m = <uint64_t>iv if digits <= 15 else 0
        exact = digits <= 15
        intlike = True
        if p < end and s[p] == b'.':
            p += 1
            intlike = False
            if p >= end or not _is_digit(s[p]):
                return None
            while p < end and _is_digit(s[p]):
                if exact:
                    m = m * 10 + <uint64_t>(s[p] - 48)
                    e10 -= 1
                    if m >= (<uint64_t>1 << 53):
                        exact = False
                p += 1
        if p < end and (s[p] == b'e' or s[p] == b'E'):
            p += 1
            intlike = False
            eneg = False
            if p < end and (s[p] == b'+' or s[p] == b'-'):
                eneg = s[p] == b'-'
                p += 1
            if p >= end or not _is_digit(s[p]):
                return None
            ev = 0
            while p < end and _is_digit(s[p]):
                if ev < 100000:
                    ev = ev * 10 + (s[p] - 48)
                p += 1
            e10 += -ev if eneg else ev
        if intlike:
            if digits > 15:  # (exact in a double up to here; longer ones are the full decoder's)
                return None
            d = <double>iv  # an integer: -0 is 0, as an int is
            if neg:
                d = -d if iv else 0.0
        elif exact and -22 <= e10 <= 22:
            d = <double>m * _POW10[e10] if e10 >= 0 else <double>m / _POW10[-e10]
            if neg:
                d = -d  # (a float -0.0 keeps its sign, as orjson's does)
        else:
            d = strtod(s + t0, &stop)
            if stop != s + p or not isfinite(d):  # (a locale's other decimal point stops it early)
                return None
        if tn == cnp.NPY_FLOAT:
            f32[count] = <float>d
        else:
            f64[count] = d
        count += 1
        p = _json_ws(s, p, end)
        if p < end and s[p] == b',':
            p = _json_ws(s, p + 1, end)
            continue
        if p < end and s[p] == b']':
            break
        return None
    if count != n:
        return None
    p = _json_ws(s, p + 1, end)
    if p >= end or s[p] != b'}':
        return None
    if _json_ws(s, p + 1, end) != end:
        return None
    return arr


cpdef Py_ssize_t take_run(list items, Py_ssize_t start, bytes app, bytes ext_head, cnp.dtype dtype, tuple shape,
                          IdSet inflight, Py_ssize_t max_n, list ids, list xs):
    """Take a run of PREDICT frames whose input the array fast path takes (admission's admitted run).

    From ``items[start]`` on, while an item is ``[1, id, app, x]`` with an unsigned integer id not held
    by ``inflight`` (nor by an earlier frame of the run), exactly the application name ``app`` (its
    UTF-8 bytes) and ``x`` an ndarray of exactly ``dtype`` and ``shape`` (:func:`array_input`),
    appends the id to ``ids``, the input to ``xs``, and adds the id to ``inflight``; at most ``max_n``
    frames. Returns the index of the first item not taken (the caller takes it the whole way).
    """
    cdef Py_ssize_t i = start, n_items, offset, alen, taken = 0
    cdef const char* a
    cdef uint64_t req_id = 0
    cdef object item, x
    if items is None or app is None or ext_head is None or inflight is None or ids is None or xs is None:
        raise TypeError("take_run: no argument may be None")
    n_items = len(items)
    alen = PyBytes_GET_SIZE(app)
    a = PyBytes_AS_STRING(app)
    if i < 0:
        i = 0
    while i < n_items and taken < max_n:
        item = items[i]
        offset = _run_head(item, a, alen, PY_SSIZE_T_MAX, &req_id)
        if offset < 0 or inflight.has(req_id):
            break
        x = array_input(item, offset, ext_head, dtype, shape)  # (exactly [1, id, app, x]: its test)
        if x is None:
            break
        inflight.add(req_id)
        ids.append(req_id)
        xs.append(x)
        taken += 1
        i += 1
    return i


cdef inline Py_ssize_t _be(const uint8_t* p, int k) noexcept nogil:
    # A big-endian unsigned length of k (1, 2 or 4) bytes.
    cdef Py_ssize_t v = 0
    cdef int i
    for i in range(k):
        v = (v << 8) | p[i]
    return v


cpdef Py_ssize_t count_objects(object body, Py_ssize_t offset, Py_ssize_t limit) except -2:
    """How many msgpack objects the one object at ``offset`` of ``body`` is made of (itself, and every
    element, key and value inside it), read without building any; ``limit + 1`` as soon as there are
    more than ``limit``; -1 when the bytes end first or hold no msgpack type (0xc1): the decoder then
    says what is wrong. A decoder builds a Python object for each: this bounds what a frame may make."""
    cdef Py_buffer pybuf
    cdef const uint8_t* p
    cdef Py_ssize_t n, pos = offset, count = 0, size
    cdef uint64_t remaining = 1
    cdef uint8_t b
    cdef int k
    PyObject_GetBuffer(body, &pybuf, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>pybuf.buf
        n = pybuf.len
        while remaining:
            if pos < 0 or pos >= n:
                return -1
            b = p[pos]
            pos += 1
            remaining -= 1
            count += 1
            if count > limit:
                return limit + 1
            if b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3:
                continue
            if b <= 0x8F:  # fixmap
                remaining += 2 * (b & 0x0F)
                continue
            if b <= 0x9F:  # fixarray
                remaining += b & 0x0F
                continue
            if b <= 0xBF:  # fixstr
                pos += b & 0x1F
                continue
            if b == 0xC1:
                return -1
            if b == 0xDC or b == 0xDD or b == 0xDE or b == 0xDF:  # array16/32, map16/32
                k = 2 if (b == 0xDC or b == 0xDE) else 4
                if pos + k > n:
                    return -1
                size = _be(p + pos, k)
                pos += k
                remaining += <uint64_t>size * (2 if b >= 0xDE else 1)
                continue
            if b == 0xC4 or b == 0xC5 or b == 0xC6 or b == 0xD9 or b == 0xDA or b == 0xDB:  # bin, str
                k = 1 << (b - 0xC4) if b <= 0xC6 else 1 << (b - 0xD9)
                if pos + k > n:
                    return -1
                pos += k + _be(p + pos, k)
                continue
            if b == 0xC7 or b == 0xC8 or b == 0xC9:  # ext8/16/32: the length, a type byte, the data
                k = 1 << (b - 0xC7)
                if pos + k > n:
                    return -1
                pos += k + 1 + _be(p + pos, k)
                continue
            if b == 0xCA or b == 0xCB:  # float32/64
                pos += 4 if b == 0xCA else 8
            elif b <= 0xCF:  # uint8..64
                pos += 1 << (b - 0xCC)
            elif b <= 0xD3:  # int8..64
                pos += 1 << (b - 0xD0)
            else:  # fixext1..16 (0xd4..0xd8): a type byte, then the data
                pos += 1 + (1 << (b - 0xD4))
        return count if pos <= n else -1
    finally:
        PyBuffer_Release(&pybuf)
