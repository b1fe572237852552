"""Message codec of the Clipper wire protocol, version 1.

The normative description is ``docs/protocol.md``; this module is its
reference implementation. Every message is one msgpack array inside a
length-prefixed frame (4-byte big-endian unsigned length, then the body).

Numpy arrays travel as msgpack extension type 1 (``EXT_NDARRAY``)::

    u8      L            length of the dtype string
    L bytes dtype        numpy typestr, e.g. "<f4" (little-endian float32)
    u8      ndim         number of dimensions (0..MAX_NDIM)
    ndim x u32 (BE)      the dimensions
    rest                 raw element bytes, C order, exactly prod(dims) * itemsize

Decoding returns a read-only numpy view onto the extension's bytes: no
element is copied.
"""

from __future__ import annotations

import reprlib
import struct
import threading
from dataclasses import dataclass

import msgpack
import numpy as np

from ..errors import (
    ClipperError,
    LimitExceededError,
    MalformedFrameError,
    error_for_code,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "HELLO",
    "PREDICT",
    "FEEDBACK",
    "PING",
    "HELLO_OK",
    "RESULT",
    "FEEDBACK_OK",
    "PONG",
    "ERROR",
    "EXT_NDARRAY",
    "MAX_NDIM",
    "ALLOWED_DTYPES",
    "DecodeLimits",
    "encode_ndarray",
    "decode_ndarray",
    "ndarray_ext_head",
    "pack",
    "make_unpacker",
    "frame",
    "hello",
    "predict",
    "feedback",
    "ping",
    "hello_ok",
    "result",
    "feedback_ok",
    "pong",
    "error",
    "error_from_message",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Message type codes: requests (client -> server) below 64, replies from 64.
HELLO = 0
PREDICT = 1
FEEDBACK = 2
PING = 3
DESCRIBE = 4
HELLO_OK = 64
RESULT = 65
FEEDBACK_OK = 66
PONG = 67
DESCRIPTION = 68
ERROR = 127

REQUEST_TYPES = frozenset((HELLO, PREDICT, FEEDBACK, PING, DESCRIBE))

EXT_NDARRAY = 1
MAX_NDIM = 32

# The dtypes an array may have on the wire: numpy typestrs, explicit byte order.
ALLOWED_DTYPES = {
    "|b1": np.dtype(np.bool_),
    "|i1": np.dtype("|i1"),
    "|u1": np.dtype("|u1"),
    "<i2": np.dtype("<i2"),
    "<u2": np.dtype("<u2"),
    "<i4": np.dtype("<i4"),
    "<u4": np.dtype("<u4"),
    "<i8": np.dtype("<i8"),
    "<u8": np.dtype("<u8"),
    "<f2": np.dtype("<f2"),
    "<f4": np.dtype("<f4"),
    "<f8": np.dtype("<f8"),
}
_TYPESTR = {dt: ts.encode() for ts, dt in ALLOWED_DTYPES.items()}
# numpy refuses shapes whose byte span (zero dims counted as 1) overflows intp,
# even for zero-size arrays; such a shape is refused as a limit.
_MAX_SPAN = np.iinfo(np.intp).max
_DIM = struct.Struct(">I")
_FRAME_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied when decoding untrusted msgpack (all configurable).

    ``max_frame_bytes`` bounds a whole frame; the others bound what one frame
    may unpack into. Nesting is bounded by msgpack itself: 1024 arrays/maps deep
    (the message array included) decode, 1025 do not.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    max_str_len: int = 1024 * 1024
    max_bin_len: int = 16 * 1024 * 1024
    max_array_len: int = 1024 * 1024
    max_map_len: int = 4096
    max_ext_len: int = 16 * 1024 * 1024
    # Objects one frame may decode into (every element, key and value counted): a decoder makes a Python
    # object of at least 56 bytes for each, so an array of empty arrays would grow 65-fold. A frame of at
    # most this many bytes cannot hold more; a longer one is counted first, without building anything.
    max_objects: int = 2 * 1024 * 1024


# ------------------------------------------------------------------- ndarrays
def _array_header(ts: bytes, shape: tuple) -> bytes:
    """An ``EXT_NDARRAY`` payload's header: the typestr's length and bytes, ndim, each dimension (BE u32)."""
    return bytes((len(ts),)) + ts + bytes((len(shape),)) + b"".join(_DIM.pack(d) for d in shape)


def encode_ndarray(arr: np.ndarray) -> msgpack.ExtType:
    """Encode ``arr`` as an ``EXT_NDARRAY`` extension (one copy of the data)."""
    dt = arr.dtype
    ts = _TYPESTR.get(dt)
    if ts is None:
        if dt.byteorder == ">" and dt.newbyteorder("<") in _TYPESTR:
            arr = arr.astype(dt.newbyteorder("<"))
            ts = _TYPESTR[arr.dtype]
        else:
            raise TypeError(f"array dtype {dt} cannot travel; allowed: {sorted(ALLOWED_DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise TypeError(f"array has {arr.ndim} dimensions; at most {MAX_NDIM} may travel")
    head = _array_header(ts, arr.shape)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.size == 0:
        return msgpack.ExtType(EXT_NDARRAY, head)
    # (numpy's stubs do not say an ndarray is a buffer)
    return msgpack.ExtType(EXT_NDARRAY, b"".join((head, arr.reshape(-1).view(np.uint8))))  # type: ignore[arg-type]


def ndarray_ext_head(dtype: np.dtype, shape: tuple) -> bytes | None:
    """The bytes that begin the msgpack encoding of every ``EXT_NDARRAY`` of ``dtype`` and ``shape``
    as :func:`encode_ndarray` and msgpack's packer write them (the extension's marker, length and
    type, then the array header): what the msgpack port's array fast path compares a frame's input
    with (``framing.array_input``). None for a dtype that cannot travel or too many dimensions."""
    ts = _TYPESTR.get(np.dtype(dtype))
    if ts is None or len(shape) > MAX_NDIM:
        return None
    nbytes = np.dtype(dtype).itemsize
    for d in shape:
        nbytes *= d
    head = _array_header(ts, shape)
    size = len(head) + nbytes  # the extension's payload
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}.get(size)
    if fixext is not None:
        marker = bytes((fixext, EXT_NDARRAY))
    elif size <= 0xFF:
        marker = bytes((0xC7, size, EXT_NDARRAY))
    elif size <= 0xFFFF:
        marker = b"\xc8" + size.to_bytes(2, "big") + bytes((EXT_NDARRAY,))
    elif size <= 0xFFFFFFFF:
        marker = b"\xc9" + size.to_bytes(4, "big") + bytes((EXT_NDARRAY,))
    else:
        return None
    return marker + head


def decode_ndarray(data: bytes) -> np.ndarray:
    """Decode the payload of an ``EXT_NDARRAY`` extension into a numpy view.

    Raises :class:`MalformedFrameError` when the payload is not well formed.
    """
    n = len(data)
    if n < 2:
        raise MalformedFrameError(f"ndarray extension of {n} bytes is too short")
    ts_len = data[0]
    pos = 1 + ts_len
    if pos + 1 > n:
        raise MalformedFrameError("ndarray extension is truncated inside its dtype")
    dtype = ALLOWED_DTYPES.get(data[1:pos].decode("ascii", "replace"))
    if dtype is None:
        raise MalformedFrameError(
            f"ndarray dtype {data[1:pos]!r} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    ndim = data[pos]
    pos += 1
    if ndim > MAX_NDIM:
        raise LimitExceededError(f"ndarray has {ndim} dimensions; at most {MAX_NDIM} allowed")
    end = pos + 4 * ndim
    if end > n:
        raise MalformedFrameError("ndarray extension is truncated inside its shape")
    shape = struct.unpack_from(f">{ndim}I", data, pos)
    count = 1
    span = dtype.itemsize  # bytes the array would span with its zero dims as 1
    for d in shape:
        count *= d
        span *= d or 1
    if span > _MAX_SPAN:
        raise LimitExceededError(
            f"ndarray shape {tuple(shape)} of dtype {dtype} is too large to represent")
    if (n - end) != count * dtype.itemsize:
        raise MalformedFrameError(
            f"ndarray of shape {tuple(shape)} and dtype {dtype} needs "
            f"{count * dtype.itemsize} data bytes; the extension carries {n - end}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == EXT_NDARRAY:
        return decode_ndarray(data)
    raise MalformedFrameError(f"unknown msgpack extension type {code}; only {EXT_NDARRAY} (ndarray) is defined")


def _default(obj):
    if isinstance(obj, np.ndarray):
        return encode_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode object of type {type(obj).__name__} on the wire")


_local = threading.local()


def _new_packer() -> msgpack.Packer:
    packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)
    return packer


class PackedExtra(dict):
    """A RESULT ``extra`` map sent with many answers (a route's constant one), encoded once.

    It is a dict for everyone else (the REST interface, tests); the msgpack
    port sends ``packed``. Do not change it after it is made.
    """

    __slots__ = ("packed",)

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.packed = _new_packer().pack(dict(self))


def new_packer() -> msgpack.Packer:
    """A Packer for one thread (the event loop's): numpy arrays become EXT_NDARRAY."""
    return msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)


def pack(obj) -> bytes:
    """msgpack-encode one message body (numpy arrays become EXT_NDARRAY).

    Safe to call from several threads: each thread packs with its own Packer.
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _new_packer()
    return packer.pack(obj)


def frame(body: bytes) -> bytes:
    """Prefix ``body`` with its 4-byte big-endian length."""
    return _FRAME_HEADER.pack(len(body)) + body


def make_unpacker(limits: DecodeLimits = DecodeLimits()):
    """Return ``unpack(buf) -> object`` that applies ``limits``.

    The function raises :class:`MalformedFrameError` or
    :class:`LimitExceededError`; never another exception type.
    """
    unpackb = msgpack.unpackb
    kw = dict(
        ext_hook=_ext_hook,
        raw=False,
        strict_map_key=True,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=limits.max_ext_len,
    )

    max_objects = limits.max_objects
    from .._native import framing  # (here: clipper._native does not import this module, nor this it at load)

    count_objects = framing.count_objects

    def unpack(buf):
        if len(buf) > max_objects and count_objects(buf, 0, max_objects) > max_objects:
            raise LimitExceededError(f"message decodes into more than {max_objects} msgpack objects "
                                     f"(max_decoded_objects)")
        try:
            return unpackb(buf, **kw)
        except ClipperError:
            raise
        except msgpack.StackError:
            raise LimitExceededError("message nests arrays/maps more than 1024 levels deep") from None
        except ValueError as exc:
            text = str(exc)
            if "exceeds max" in text:
                raise LimitExceededError(f"message exceeds a decoding limit: {text}") from None
            raise MalformedFrameError(f"frame body is not valid msgpack: {text or _msgpack_detail(exc, buf)}") from None
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedFrameError(f"frame body is not valid msgpack: {_msgpack_detail(exc, buf)}") from None

    return unpack


def _msgpack_detail(exc: Exception, buf) -> str:
    """``Type: message`` of msgpack's exception; its FormatError has no message, so then what the fault is
    and how the body begins, in hex (at most 16 bytes)."""
    text = str(exc)
    if text:
        return f"{type(exc).__name__}: {text}"
    head = bytes(memoryview(buf)[:16]).hex(" ")
    what = ("a byte that is no msgpack type (0xc1, or an unknown ext form)" if isinstance(exc, msgpack.FormatError)
            else f"{type(exc).__name__}")
    return f"{what}; the body's {len(buf)} bytes begin {head or '(empty)'}"


# ------------------------------------------------------------ message builders
# Each builder returns the message as a Python list, ready for pack().
def hello(req_id: int, versions=SUPPORTED_VERSIONS, client: str = "", api_key: str | None = None) -> list:
    """HELLO; ``api_key`` (sent only when given) authenticates the connection where keys are required."""
    info = {"versions": list(versions), "client": client}
    if api_key is not None:
        info["api_key"] = api_key
    return [HELLO, req_id, info]


def predict(req_id: int, app: str, x, options: dict | None = None) -> list:
    return [PREDICT, req_id, app, x] if not options else [PREDICT, req_id, app, x, options]


def feedback(req_id: int, app: str, x, label, options: dict | None = None) -> list:
    msg = [FEEDBACK, req_id, app, x, label]
    if options:
        msg.append(options)
    return msg


def ping(req_id: int) -> list:
    return [PING, req_id]


def hello_ok(req_id: int, version: int, server: str, limits: dict, authenticated: bool | None = None) -> list:
    """HELLO_OK; ``authenticated`` (sent only when not None) tells whether the connection holds a valid
    API key, from a server that requires them."""
    info = {"version": version, "server": server, "limits": limits}
    if authenticated is not None:
        info["authenticated"] = authenticated
    return [HELLO_OK, req_id, info]


def result(req_id: int, query_id: int, output, is_default: bool, extra: dict | None = None) -> list:
    msg = [RESULT, req_id, query_id, output, is_default]
    if extra:
        msg.append(extra)
    return msg


def feedback_ok(req_id: int, info: dict | None = None) -> list:
    return [FEEDBACK_OK, req_id, info] if info else [FEEDBACK_OK, req_id]


def pong(req_id: int) -> list:
    return [PONG, req_id]


def describe(req_id: int, app: str) -> list:
    return [DESCRIBE, req_id, app]


def description(req_id: int, info: dict) -> list:
    return [DESCRIPTION, req_id, info]


def error(req_id, exc: ClipperError) -> list:
    return [ERROR, req_id, exc.code, exc.name, exc.message]


def error_from_message(msg: list) -> ClipperError:
    """Rebuild the exception carried by an ERROR message."""
    return error_for_code(int(msg[2]), str(msg[4]))


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 8
_BRIEF.maxlevel = 3


def brief(value) -> str:
    """A bounded ``repr`` of a peer's value for an error message: it is never echoed whole
    (a 12 MiB request id must not come back as a 50 MB error)."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 64:
        return f"{bytes(value[:64])!r}... ({len(value)} bytes)"
    return _BRIEF.repr(value)
