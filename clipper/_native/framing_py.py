"""Pure-Python twin of ``clipper._native._framing`` (same API, same behaviour).

Loaded instead of the Cython module when ``CLIPPER_NO_EXTENSIONS=1``; the
tests run both.
"""

from __future__ import annotations

import struct

import numpy as np

_HEADER = struct.Struct(">I")
HEADER_BYTES = 4

# Reader states.
READ_HEADER = 0
READ_BODY = 1
SKIP_BODY = 2


class FrameReader:
    """Split a byte stream into length-prefixed frames.

    ``feed(data)`` returns a list with one item per frame completed by
    ``data``: the frame body (``bytes`` or a ``memoryview`` onto ``data``), or,
    for a frame whose declared length exceeds ``max_frame_bytes``, the declared
    length as an ``int``. An oversized body is skipped without being buffered,
    so the reader stays in step with the stream and the next frame is read
    normally.
    """

    __slots__ = ("max_frame_bytes", "_buf", "_state", "_need", "skipped")

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._state = READ_HEADER
        self._need = HEADER_BYTES
        self.skipped = 0  # bytes of oversized frames skipped so far

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (its header or body so far): what the stream costs in memory."""
        return len(self._buf)

    @property
    def mid_frame(self) -> bool:
        """True between a frame's first byte and its last (also while an oversized body is skipped)."""
        return self._state != READ_HEADER or len(self._buf) != 0

    def feed(self, data) -> list:
        out = []
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        buf = self._buf
        while pos < n:
            state = self._state
            if state == SKIP_BODY:
                take = min(self._need, n - pos)
                pos += take
                self.skipped += take
                self._need -= take
                if self._need == 0:
                    self._state = READ_HEADER
                    self._need = HEADER_BYTES
                continue
            avail = n - pos
            if not buf and avail >= self._need:
                # Fast path: the whole piece is in ``data``.
                chunk: bytes | memoryview = view[pos : pos + self._need]
                pos += self._need
            else:
                take = min(self._need - len(buf), avail)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < self._need:
                    break
                chunk = bytes(buf)
                buf.clear()
            if state == READ_HEADER:
                length = _HEADER.unpack(chunk)[0]
                if length > self.max_frame_bytes:
                    out.append(length)
                    if length:
                        self._state = SKIP_BODY
                        self._need = length
                elif length == 0:
                    out.append(b"")
                else:
                    self._state = READ_BODY
                    self._need = length
            else:
                out.append(chunk)
                self._state = READ_HEADER
                self._need = HEADER_BYTES
        return out


def pack_frame(body) -> bytes:
    """Return ``body`` prefixed with its 4-byte big-endian length."""
    return _HEADER.pack(len(body)) + bytes(body)


def _uint(v: int) -> bytes:
    if v < 0x80:
        return bytes((v,))
    for code, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if v < 1 << (8 * n):
            return bytes((code,)) + v.to_bytes(n, "big")
    raise OverflowError(f"{v} does not fit in 64 bits")


def result_frame(req_id: int, query_id: int, output_body, is_default: bool, extra_body) -> bytes:
    """The frame of ``[RESULT, req_id, query_id, output, is_default, extra?]``.

    ``output_body`` and ``extra_body`` are already msgpack-encoded (``extra_body``
    None: the message has five elements).
    """
    if req_id < 0 or query_id < 0:
        raise OverflowError("request and query ids are unsigned")
    body = b"".join((b"\x96\x41" if extra_body is not None else b"\x95\x41", _uint(req_id), _uint(query_id),
                     bytes(output_body), b"\xc3" if is_default else b"\xc2",
                     bytes(extra_body) if extra_body is not None else b""))
    return pack_frame(body)


def assemble_batch(inputs: list, item_nbytes: int) -> bytearray:
    """Copy each input's bytes once into one contiguous buffer.

    Every input must expose exactly ``item_nbytes`` bytes through the buffer
    protocol (a C-contiguous numpy array or bytes).
    """
    out = bytearray(item_nbytes * len(inputs))
    pos = 0
    for x in inputs:
        mv = memoryview(x).cast("B")
        if len(mv) != item_nbytes:
            raise ValueError(f"input of {len(mv)} bytes in a batch of {item_nbytes}-byte items")
        out[pos : pos + item_nbytes] = mv
        pos += item_nbytes
    return out


def assemble_varlen(inputs: list) -> bytearray:
    """Variable-size inputs (bytes or str) as one buffer: offsets, then data.

    The buffer starts with ``len(inputs) + 1`` little-endian uint64 offsets
    into the data that follows (the first is 0, the last the data's length);
    item ``i`` is ``data[offsets[i]:offsets[i + 1]]``. A str travels as its
    UTF-8 bytes. Each input is copied once.
    """
    parts = []
    for x in inputs:
        if type(x) is bytes:
            parts.append(x)
        elif type(x) is str:
            parts.append(x.encode("utf-8"))
        else:
            raise TypeError(f"a variable-size batch holds bytes or str, not {type(x).__name__}")
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    out = bytearray(struct.pack(f"<{len(offsets)}Q", *offsets))
    for p in parts:
        out += p
    return out


# ------------------------------------------------------------------ nested-list inputs, before decoding
NEST_LENGTH = 1
NEST_NOT_ARRAY = 2
NEST_NOT_NUMBER = 3
NEST_UNKNOWN = 4
NEST_CONTAINER = 5
_MAX_NEST_DIMS = 32
_LEAF_SIZES = {0xC2: 0, 0xC3: 0, 0xCC: 1, 0xD0: 1, 0xCD: 2, 0xD1: 2, 0xCE: 4, 0xD2: 4, 0xCA: 4, 0xCF: 8, 0xD3: 8,
               0xCB: 8}


class _Stop(Exception):
    def __init__(self, result: tuple) -> None:
        self.result = result


def _is_ext(b: int) -> bool:
    return 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8


def _walk(p, n: int, pos: int, shape: tuple, depth: int) -> int:
    if pos >= n:
        raise _Stop((NEST_UNKNOWN, 0, 0, 0))
    b = p[pos]
    if depth < len(shape):
        if 0x90 <= b <= 0x9F:
            length, pos = b & 0x0F, pos + 1
        elif b == 0xDC:
            if pos + 3 > n:
                raise _Stop((NEST_UNKNOWN, 0, 0, 0))
            length, pos = int.from_bytes(p[pos + 1:pos + 3], "big"), pos + 3
        elif b == 0xDD:
            if pos + 5 > n:
                raise _Stop((NEST_UNKNOWN, 0, 0, 0))
            length, pos = int.from_bytes(p[pos + 1:pos + 5], "big"), pos + 5
        elif _is_ext(b):
            raise _Stop((NEST_UNKNOWN, 0, 0, 0))
        else:
            raise _Stop((NEST_NOT_ARRAY, depth, 0, 0))
        if length != shape[depth]:
            raise _Stop((NEST_LENGTH, depth, length, shape[depth]))
        for _ in range(length):
            pos = _walk(p, n, pos, shape, depth + 1)
        return pos
    if b <= 0x7F or b >= 0xE0:
        size = 0
    elif b in _LEAF_SIZES:
        size = _LEAF_SIZES[b]
    elif _is_ext(b):
        raise _Stop((NEST_UNKNOWN, 0, 0, 0))
    elif 0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF:
        raise _Stop((NEST_CONTAINER, depth, 0, 0))
    else:
        raise _Stop((NEST_NOT_NUMBER, depth, b, 0))
    if pos + 1 + size > n:
        raise _Stop((NEST_UNKNOWN, 0, 0, 0))
    return pos + 1 + size


def check_nested(body, offset: int, shape: tuple):
    """Check the msgpack value at ``offset`` of ``body`` against ``shape`` without building it.

    Returns None when it is nested arrays of exactly ``shape`` with number
    (or bool) leaves; else ``(kind, depth, got, want)``: 1 an array of
    ``got`` items where dimension ``depth`` is ``want``, 2 not an array
    where dimension ``depth`` expects one, 3 a leaf that is not a number
    (``got`` its msgpack type byte), 4 not decidable here (truncated, or an
    extension value), 5 an array or map where a number is expected.
    """
    if not shape or len(shape) > _MAX_NEST_DIMS:
        return (NEST_UNKNOWN, 0, 0, 0)
    p = memoryview(body).cast("B")
    try:
        _walk(p, len(p), offset, tuple(shape), 0)
    except _Stop as stop:
        return stop.result
    return None


def request_head(body):
    """The head of a PREDICT or FEEDBACK frame, read from its bytes without decoding the rest.

    Returns ``(kind, req_id, app, offset, is_list)`` for ``[kind, id, app,
    input, ...]`` with ``kind`` 1 or 2, an unsigned integer id and a str app
    of at most 4 KiB: ``offset`` is where the input starts, ``is_list``
    whether it is a msgpack array. None for every other frame.
    """
    p = memoryview(body).cast("B")
    n = len(p)
    if n < 4 or not (0x94 <= p[0] <= 0x96) or p[1] not in (1, 2):
        return None
    kind, pos = p[1], 2
    b = p[pos]
    if b <= 0x7F:
        req_id, pos = b, pos + 1
    elif 0xCC <= b <= 0xCF:
        k = 1 << (b - 0xCC)
        if pos + 1 + k > n:
            return None
        req_id, pos = int.from_bytes(p[pos + 1:pos + 1 + k], "big"), pos + 1 + k
    else:
        return None
    if pos >= n:
        return None
    b = p[pos]
    if 0xA0 <= b <= 0xBF:
        slen, pos = b & 0x1F, pos + 1
    elif b == 0xD9 and pos + 2 <= n:
        slen, pos = p[pos + 1], pos + 2
    elif b == 0xDA and pos + 3 <= n:
        slen, pos = int.from_bytes(p[pos + 1:pos + 3], "big"), pos + 3
    else:
        return None
    if slen > 4096 or pos + slen >= n:
        return None
    b = p[pos + slen]
    try:
        app = bytes(p[pos:pos + slen]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return (kind, req_id, app, pos + slen, 0x90 <= b <= 0x9F or b == 0xDC or b == 0xDD)


def error_frame(req_id: int, tail) -> bytes:
    """The frame of ``[ERROR, req_id, code, name, message]`` from ``tail``: the msgpack encodings of
    code, name and message, concatenated (a refusal's words, encoded once)."""
    import msgpack

    body = b"\x95\x7f" + msgpack.packb(req_id) + bytes(tail)
    return _HEADER.pack(len(body)) + body


def refuse_run(items: list, start: int, app: bytes, max_body: int, tail, out: bytearray) -> int:
    """Refuse a run of PREDICT frames for one application in one pass (admission's fast path).

    From ``items[start]`` on, while an item is a PREDICT frame body ``[1, id,
    app, ...]`` with an unsigned integer id, exactly the application name
    ``app`` (its UTF-8 bytes) and at most ``max_body`` bytes, appends to
    ``out`` the frame :func:`error_frame` makes for its id and ``tail``.
    Returns the index of the first item that is anything else.
    """
    if items is None or app is None or out is None:
        raise TypeError("refuse_run: items, app and out must not be None")
    i = max(start, 0)
    while i < len(items):
        item = items[i]
        if type(item) is int or len(item) > max_body:
            break
        head = request_head(item)
        if head is None or head[0] != 1:
            break
        if head[2].encode("utf-8") != app:
            break
        out += error_frame(head[1], tail)
        i += 1
    return i


PIN_RATIO = 2  # array_input copies an input out of a read more than this many times the frame


def array_input(body, offset, ext_head, dtype, shape):
    """The input of a PREDICT frame as a read-only ndarray over the frame's own bytes, or None.

    ``body`` must be ``[1, id, app, x]`` (exactly four items), ``offset``
    where ``x`` starts, and ``x`` an ``EXT_NDARRAY`` whose encoding begins
    with ``ext_head`` (``wire.ndarray_ext_head`` of ``dtype`` and ``shape``)
    and whose data, of ``dtype.itemsize * prod(shape)`` bytes, ends the frame.
    """
    if len(shape) > 32 or offset < 0:
        return None
    view = memoryview(body).cast("B")
    n = len(view)
    nbytes = dtype.itemsize
    for d in shape:
        if d < 0:
            return None
        nbytes *= d
    hlen = len(ext_head)
    if n < 1 or view[0] != 0x94 or offset + hlen + nbytes != n or view[offset:offset + hlen] != ext_head:
        return None
    count = nbytes // dtype.itemsize
    arr = np.frombuffer(view, dtype=dtype, count=count, offset=offset + hlen).reshape(shape)
    if type(body) is memoryview and len(body.obj) > PIN_RATIO * len(body):  # type: ignore[arg-type]  # (bytes-like)
        arr = arr.copy()  # a slice of a much larger read: do not pin the read
    arr.flags.writeable = False  # read-only (a bytearray body would give a writeable view)
    return arr


def floats_to_array(items, dtype):
    """A flat list of Python floats and ints (bools are ints) as a new 1-D array of ``dtype`` (float32 or
    float64), converted as numpy converts them; None for any other dtype or item, or an int too large
    for a double."""
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    values = []
    for v in items:
        if isinstance(v, float):
            values.append(float(v))
        elif isinstance(v, int):
            try:
                values.append(float(v))
            except OverflowError:
                return None
        else:
            return None
    with np.errstate(over="ignore"):  # (past float32's range is inf, as in the native cast)
        return np.array(values, dtype=np.float64).astype(dtype)
