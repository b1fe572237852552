"""Pure-Python twin of ``clipper._native._framing`` (same API, same behaviour).

Loaded instead of the Cython module when ``CLIPPER_NO_EXTENSIONS=1``; the
tests run both.
"""

from __future__ import annotations

import math
import re
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


class IdSet:
    """The request ids awaiting their reply on one connection (the native one is a hash table of uint64)."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: set[int] = set()

    def add(self, key: int) -> bool:
        """Add ``key``; False (and nothing changed) when it is held already."""
        ids = self._ids
        if key in ids:
            return False
        ids.add(key)
        return True

    def discard(self, key: int) -> bool:
        try:
            self._ids.remove(key)
        except KeyError:
            return False
        return True

    def has(self, key: int) -> bool:
        return key in self._ids

    def __contains__(self, key) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def clear(self) -> None:
        self._ids.clear()


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


def assemble_arrays(inputs: list, ndim: int) -> bytearray:
    """Numpy arrays of one dtype and ``ndim`` dimensions but any shapes, as one buffer (the ``"vl"``
    encoding of arrays): ``len(inputs) + 1`` little-endian uint64 byte offsets into the data, then
    each item's shape (``ndim`` little-endian uint64 each), then the data. Each item is copied once."""
    offsets = [0]
    dims: list[int] = []
    inputs = [np.ascontiguousarray(x) for x in inputs]
    for i, x in enumerate(inputs):
        if x.ndim != ndim:
            raise ValueError(f"item {i} of an array batch has {x.ndim} dimensions; expected {ndim}")
        offsets.append(offsets[-1] + x.nbytes)
        dims.extend(x.shape)
    out = bytearray(struct.pack(f"<{len(offsets)}Q", *offsets))
    out += struct.pack(f"<{len(dims)}Q", *dims)
    for x in inputs:
        out += x.reshape(-1).view(np.uint8).tobytes()
    return out


# ------------------------------------------------------------------ list inputs: the order of the checks
MAX_NEST_DIMS = 32  # a list input nests at most this many arrays (EXT_NDARRAY's MAX_NDIM)
NEST_UNDECIDED = 0
NEST_INVALID = 201
NEST_TOO_LARGE = 205
NEST_DTYPE = 203
NEST_SHAPE = 204
# the msgpack type byte that stands for a value of each Python type in a verdict (as the native walk reports it)
_TYPE_BYTE = {str: 0xA0, bytes: 0xC4, type(None): 0xC0, dict: 0x80}


class _ListScan:
    __slots__ = ("dims", "has_float", "leaf_depth", "max_arr_depth", "nonnum", "ragged", "too_deep", "values")

    def __init__(self) -> None:
        self.values = 0
        self.dims: list[int] = []
        self.leaf_depth = self.max_arr_depth = self.nonnum = -1
        self.has_float = self.ragged = self.too_deep = False

    def walk(self, v, depth: int) -> bool:
        """Walk ``v`` (a decoded value at array depth ``depth``); False when too deep (the walk stops)."""
        if type(v) is list:
            if depth >= MAX_NEST_DIMS:
                self.too_deep = True
                return False
            if depth < len(self.dims):
                if len(v) != self.dims[depth]:
                    self.ragged = True
            else:
                self.dims.append(len(v))
            self.max_arr_depth = max(self.max_arr_depth, depth)
            for item in v:
                if not self.walk(item, depth + 1):
                    return False
            return True
        if self.leaf_depth < 0:
            self.leaf_depth = depth
        elif self.leaf_depth != depth:
            self.ragged = True
        self.values += 1
        t = type(v)
        if t is float or isinstance(v, np.floating):
            self.has_float = True
        elif not (t is int or t is bool or isinstance(v, (np.integer, np.bool_))) and self.nonnum < 0:
            self.nonnum = _TYPE_BYTE.get(t, 0xC7)  # (an ndarray or an extension value: 0xc7, as ext 8)
        return True


def judge_list(x: list, shape: tuple, itemsize: int, max_bytes: int, int_app: bool):
    """The verdict of docs/protocol.md section 4 on a decoded list input, as :func:`check_nested`
    gives it on its bytes: None (it passes; values out of range are judged by the conversion), or
    ``(verdict, detail)``."""
    s = _ListScan()
    if not s.walk(x, 0):
        return (NEST_INVALID, 0)
    return _verdict(s, tuple(shape), itemsize, max_bytes, int_app)


_SKIP_DEPTH = 64
_FIXED = {0xCC: 1, 0xD0: 1, 0xCD: 2, 0xD1: 2, 0xCE: 4, 0xD2: 4, 0xCF: 8, 0xD3: 8}


class _Undecided(Exception):
    pass


def _skip(p, n: int, pos: int, depth: int) -> int:
    """The position after the msgpack value at ``pos`` (a value that is not a number: skipped whole)."""
    if pos >= n or depth > _SKIP_DEPTH:
        raise _Undecided
    b = p[pos]
    size = items = 0
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
        return pos + 1
    if 0xA0 <= b <= 0xBF:
        size, pos = b & 0x1F, pos + 1
    elif 0x80 <= b <= 0x8F:
        items, pos = 2 * (b & 0x0F), pos + 1
    elif 0x90 <= b <= 0x9F:
        items, pos = b & 0x0F, pos + 1
    elif b in _FIXED or b in (0xCA, 0xCB):
        size, pos = _FIXED.get(b, 4 if b == 0xCA else 8), pos + 1
    elif b in (0xD9, 0xC4, 0xDA, 0xC5, 0xDB, 0xC6, 0xC7, 0xC8, 0xC9):
        k = {0xD9: 1, 0xC4: 1, 0xC7: 1, 0xDA: 2, 0xC5: 2, 0xC8: 2}.get(b, 4)
        if pos + 1 + k > n:
            raise _Undecided
        size = int.from_bytes(p[pos + 1:pos + 1 + k], "big") + (1 if b in (0xC7, 0xC8, 0xC9) else 0)
        pos += 1 + k
    elif 0xD4 <= b <= 0xD8:
        size, pos = 1 + (1 << (b - 0xD4)), pos + 1
    elif b in (0xDC, 0xDE, 0xDD, 0xDF):
        k = 2 if b in (0xDC, 0xDE) else 4
        if pos + 1 + k > n:
            raise _Undecided
        items = int.from_bytes(p[pos + 1:pos + 1 + k], "big") * (2 if b in (0xDE, 0xDF) else 1)
        pos += 1 + k
    else:
        raise _Undecided  # 0xc1: never used
    if size > n - pos:
        raise _Undecided
    pos += size
    for _ in range(items):
        pos = _skip(p, n, pos, depth + 1)
    return pos


def _canonical_byte(b: int) -> int:
    if 0xA0 <= b <= 0xBF or 0xD9 <= b <= 0xDB:
        return 0xA0
    if 0xC4 <= b <= 0xC6:
        return 0xC4
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        return 0x80
    return 0xC0 if b == 0xC0 else 0xC7


class _Deep(Exception):
    pass


def _scan(p, n: int, pos: int, depth: int, s: _ListScan) -> int:
    if pos >= n:
        raise _Undecided
    b = p[pos]
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        if depth >= MAX_NEST_DIMS:
            raise _Deep
        if b == 0xDC or b == 0xDD:
            k = 2 if b == 0xDC else 4
            if pos + 1 + k > n:
                raise _Undecided
            length, pos = int.from_bytes(p[pos + 1:pos + 1 + k], "big"), pos + 1 + k
        else:
            length, pos = b & 0x0F, pos + 1
        if depth < len(s.dims):
            if length != s.dims[depth]:
                s.ragged = True
        else:
            s.dims.append(length)
        s.max_arr_depth = max(s.max_arr_depth, depth)
        for _ in range(length):
            pos = _scan(p, n, pos, depth + 1, s)
        return pos
    if s.leaf_depth < 0:
        s.leaf_depth = depth
    elif s.leaf_depth != depth:
        s.ragged = True
    s.values += 1
    if b <= 0x7F or b >= 0xE0 or b in (0xC2, 0xC3):
        return pos + 1
    if b in (0xCA, 0xCB):
        s.has_float = True
        pos += 5 if b == 0xCA else 9
    elif b in _FIXED:
        pos += 1 + _FIXED[b]
    else:
        if s.nonnum < 0:
            s.nonnum = _canonical_byte(b)
        return _skip(p, n, pos, depth)
    if pos > n:
        raise _Undecided
    return pos


def _verdict(s: _ListScan, shape: tuple, itemsize: int, max_bytes: int, int_app: bool):
    if s.values > max_bytes // itemsize:
        return (NEST_TOO_LARGE, s.values)
    if s.ragged or (s.leaf_depth >= 0 and s.max_arr_depth >= s.leaf_depth):
        return (NEST_INVALID, 1)
    if s.nonnum >= 0:
        return (NEST_DTYPE, s.nonnum)
    if s.has_float and int_app:
        return (NEST_DTYPE, 0xCB)
    got = tuple(s.dims[:s.leaf_depth] if s.leaf_depth >= 0 else s.dims)
    if len(got) != len(shape) or any(w != -1 and w != g for g, w in zip(got, shape)):
        return (NEST_SHAPE, got)
    return None


def check_nested(body, offset: int, shape: tuple, itemsize: int, max_bytes: int, int_app: bool):
    """Judge the list input (a msgpack array) at ``offset`` of ``body`` without building it, by the
    rules of docs/protocol.md section 4 in their order: None when it passes, else ``(verdict,
    detail)`` (201 too deep (0) or ragged (1); 205 too large (the number of values); 203 not a number
    or a float for ``int_app`` (a msgpack type byte); 204 another shape (the list's shape); 0
    undecidable here: the decoder judges the frame). The same verdict as :func:`judge_list` gives the
    decoded list."""
    p = memoryview(body).cast("B")
    s = _ListScan()
    try:
        _scan(p, len(p), offset, 0, s)
    except _Deep:
        return (NEST_INVALID, 0)
    except _Undecided:
        return (NEST_UNDECIDED, 0)
    return _verdict(s, tuple(shape), itemsize, max_bytes, int_app)


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


def refuse_run(items: list, start: int, app: bytes, max_body: int, tail, out: bytearray, inflight=None,
               max_out: int = -1) -> int:
    """Refuse a run of PREDICT frames for one application in one pass (admission's fast path).

    From ``items[start]`` on, while an item is a PREDICT frame body ``[1, id,
    app, ...]`` with an unsigned integer id, exactly the application name
    ``app`` (its UTF-8 bytes) and at most ``max_body`` bytes, appends to
    ``out`` the frame :func:`error_frame` makes for its id and ``tail``.
    Returns the index of the first item that is anything else (or whose id
    ``inflight`` holds: a duplicate, refused as such by the caller), or of the
    first left once ``out`` holds ``max_out`` bytes (negative: no bound).
    """
    if items is None or app is None or out is None:
        raise TypeError("refuse_run: items, app and out must not be None")
    return _answer_run(items, start, app, max_body, out, inflight, lambda req_id, k: error_frame(req_id, tail),
                       max_out)


def default_run(items: list, start: int, app: bytes, max_body: int, first_qid: int, output_body, extra_body,
                out: bytearray, inflight=None, max_out: int = -1) -> int:
    """The twin of the native ``default_run``: the frames :func:`refuse_run` would take, each answered
    with :func:`result_frame` of its id, query id ``first_qid + k`` (the k-th taken), the default
    ``output_body`` flagged as a default, and ``extra_body``."""
    if items is None or app is None or out is None or output_body is None:
        raise TypeError("default_run: items, app, output_body and out must not be None")
    return _answer_run(items, start, app, max_body, out, inflight,
                       lambda req_id, k: result_frame(req_id, first_qid + k, output_body, True, extra_body), max_out)


def _answer_run(items: list, start: int, app: bytes, max_body: int, out: bytearray, inflight, frame,
                max_out: int) -> int:
    i = max(start, 0)
    k = 0
    while i < len(items):
        if 0 <= max_out <= len(out):
            break
        item = items[i]
        if type(item) is int or len(item) > max_body:
            break
        head = request_head(item)
        if head is None or head[0] != 1:
            break
        if head[2].encode("utf-8") != app:
            break
        if inflight is not None and head[1] in inflight:
            break
        out += frame(head[1], k)
        k += 1
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


_JSON_WS = b" \t\n\r"  # JSON's whitespace (not Python's: no \x0b, \x0c)
_JSON_VECTOR_BODY = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"input"[ \t\n\r]*:[ \t\n\r]*\[(.*)\][ \t\n\r]*\}[ \t\n\r]*',
                               re.S)
_JSON_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_JSON_COMMA = re.compile(rb"[ \t\n\r]*,[ \t\n\r]*")


def json_vector(raw, dtype, n):
    """A REST body that is exactly ``{"input": [n JSON numbers]}`` (JSON whitespace anywhere between
    tokens) as a new 1-D array of ``dtype`` (float32 or float64), each number to the nearest double and
    then to the dtype; None for anything else (another dtype, key or count, ``n`` 0, a number outside
    the strict grammar, an integer of more than 15 digits, a double that is not finite)."""
    if type(raw) is not bytes or n <= 0 or dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    m = _JSON_VECTOR_BODY.fullmatch(raw)
    if m is None:
        return None
    tokens = _JSON_COMMA.split(m.group(1).strip(_JSON_WS))
    if len(tokens) != n:
        return None
    values = []
    for tok in tokens:
        num = _JSON_NUMBER.fullmatch(tok)
        if num is None:
            return None
        if num.group(1) is None and num.group(2) is None:  # an integer (-0 is 0)
            if len(tok.lstrip(b"-")) > 15:
                return None
            values.append(float(int(tok)))
        else:
            d = float(tok)
            if not math.isfinite(d):
                return None
            values.append(d)
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float64).astype(dtype)


def take_run(items: list, start: int, app: bytes, ext_head: bytes, dtype, shape: tuple, inflight, max_n: int,
             ids: list, xs: list) -> int:
    """Take a run of PREDICT frames ``[1, id, app, x]`` whose ``x`` the array fast path takes, each id new
    to ``inflight`` (added as taken), at most ``max_n``: ids to ``ids``, inputs to ``xs``; returns the
    index of the first item not taken."""
    if items is None or app is None or ext_head is None or inflight is None or ids is None or xs is None:
        raise TypeError("take_run: no argument may be None")
    i, taken = max(start, 0), 0
    while i < len(items) and taken < max_n:
        item = items[i]
        if type(item) is int:
            break
        head = request_head(item)
        if (head is None or head[0] != 1 or head[2].encode("utf-8") != app
                or inflight.has(head[1])):
            break
        x = array_input(item, head[3], ext_head, dtype, shape)
        if x is None:
            break
        inflight.add(head[1])
        ids.append(head[1])
        xs.append(x)
        taken += 1
        i += 1
    return i


def count_objects(body, offset: int, limit: int) -> int:
    """How many msgpack objects the one object at ``offset`` of ``body`` is made of (itself, and every
    element, key and value inside it), read without building any; ``limit + 1`` as soon as there are
    more than ``limit``; -1 when the bytes end first or hold no msgpack type (0xc1): the decoder then
    says what is wrong. A decoder builds a Python object for each: this bounds what a frame may make."""
    p = memoryview(body).cast("B")
    n = len(p)
    pos, count, remaining = offset, 0, 1
    while remaining:
        if pos < 0 or pos >= n:
            return -1
        b = p[pos]
        pos += 1
        remaining -= 1
        count += 1
        if count > limit:
            return limit + 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if b <= 0x8F:  # fixmap
            remaining += 2 * (b & 0x0F)
        elif b <= 0x9F:  # fixarray
            remaining += b & 0x0F
        elif b <= 0xBF:  # fixstr
            pos += b & 0x1F
        elif b == 0xC1:
            return -1
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):  # array16/32, map16/32
            k = 2 if b in (0xDC, 0xDE) else 4
            if pos + k > n:
                return -1
            size = int.from_bytes(p[pos:pos + k], "big")
            pos += k
            remaining += size * (2 if b >= 0xDE else 1)
        elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):  # bin, str
            k = 1 << (b - 0xC4) if b <= 0xC6 else 1 << (b - 0xD9)
            if pos + k > n:
                return -1
            pos += k + int.from_bytes(p[pos:pos + k], "big")
        elif b in (0xC7, 0xC8, 0xC9):  # ext8/16/32: the length, a type byte, the data
            k = 1 << (b - 0xC7)
            if pos + k > n:
                return -1
            pos += k + 1 + int.from_bytes(p[pos:pos + k], "big")
        elif b in (0xCA, 0xCB):  # float32/64
            pos += 4 if b == 0xCA else 8
        elif b <= 0xCF:  # uint8..64
            pos += 1 << (b - 0xCC)
        elif b <= 0xD3:  # int8..64
            pos += 1 << (b - 0xD0)
        else:  # fixext1..16 (0xd4..0xd8): a type byte, then the data
            pos += 1 + (1 << (b - 0xD4))
    return count if pos <= n else -1
