"""Property tests of the wire codec (clipper.protocol.wire) and of the stream
framing, on both implementations (native Cython and its pure-Python twin)."""

from __future__ import annotations

import importlib
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import clipper._native.framing_py as framing_py
from clipper.errors import LimitExceededError, MalformedFrameError
from clipper.protocol import wire

framing_native = importlib.import_module("clipper._native._framing")
IMPLS = pytest.mark.parametrize("impl", [framing_py, framing_native], ids=["python", "native"])

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODE_ERRORS = (MalformedFrameError, LimitExceededError)
TYPESTRS = sorted(wire.ALLOWED_DTYPES)


# --------------------------------------------------------------------- strategies
@st.composite
def ndarrays(draw, max_dims=4, max_side=5):
    dtype = wire.ALLOWED_DTYPES[draw(st.sampled_from(TYPESTRS))]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    return draw(hnp.arrays(dtype, shape))


def _base_object(arr: np.ndarray):
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return arr


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
messages = st.lists(msgpack_values | ndarrays(max_dims=2, max_side=3), min_size=1, max_size=6)


# --------------------------------------------------------------------- ndarrays
@FAST
@given(ndarrays())
def test_ndarray_round_trip(arr):
    ext = wire.encode_ndarray(arr)
    assert ext.code == wire.EXT_NDARRAY
    data = ext.data
    typestr = arr.dtype.str.encode()
    # The documented layout, byte by byte.
    assert data[0] == len(typestr) and data[1 : 1 + len(typestr)] == typestr
    pos = 1 + len(typestr)
    assert data[pos] == arr.ndim
    assert struct.unpack_from(f">{arr.ndim}I", data, pos + 1) == arr.shape
    assert data[pos + 1 + 4 * arr.ndim :] == arr.tobytes(order="C")

    out = wire.decode_ndarray(data)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # bytewise, so NaNs compare too
    assert not out.flags.writeable
    assert _base_object(out) is data  # a view onto the payload: no copy


@FAST
@given(ndarrays(max_dims=3))
def test_ndarray_round_trip_inside_a_message(arr):
    unpack = wire.make_unpacker()
    msg = unpack(wire.pack(wire.predict(7, "app", arr)))
    assert msg[:3] == [wire.PREDICT, 7, "app"]
    assert msg[3].dtype == arr.dtype and msg[3].shape == arr.shape
    assert msg[3].tobytes() == arr.tobytes()


@FAST
@given(ndarrays(max_dims=3, max_side=6), st.data())
def test_strided_and_big_endian_arrays_travel_as_values(arr, data):
    variants = [arr.T]
    if arr.ndim:
        variants.append(arr[:: data.draw(st.integers(1, 3))])
    if arr.dtype.byteorder == "<":
        variants.append(arr.astype(arr.dtype.newbyteorder(">")))
    for view in variants:
        out = wire.decode_ndarray(wire.encode_ndarray(view).data)
        assert out.dtype.str in wire.ALLOWED_DTYPES and out.shape == view.shape
        assert out.tobytes() == np.ascontiguousarray(view).astype(out.dtype).tobytes()


def test_zero_dimensional_and_empty_arrays():
    for arr in (np.array(2.5, np.float32), np.array(True), np.zeros((0,), np.int8),
                np.zeros((3, 0, 2), np.float64), np.zeros((0, 0), np.uint64)):
        out = wire.decode_ndarray(wire.encode_ndarray(arr).data)
        assert out.shape == arr.shape and out.dtype == arr.dtype
        assert np.array_equal(out, arr)


@pytest.mark.parametrize("arr", [
    np.zeros(2, np.complex64),
    np.zeros(2, object),
    np.zeros(2, "datetime64[s]"),
    np.zeros(2, "U3"),
    np.zeros(2, "V4"),
    np.zeros((1,) * (wire.MAX_NDIM + 1), np.uint8),
], ids=["complex", "object", "datetime", "unicode", "void", "too-many-dims"])
def test_arrays_that_cannot_travel_are_refused(arr):
    with pytest.raises(TypeError):
        wire.encode_ndarray(arr)
    with pytest.raises(TypeError):
        wire.pack([wire.PREDICT, 1, "app", arr])


@FAST
@given(st.binary(max_size=300))
def test_decode_ndarray_on_arbitrary_bytes(data):
    try:
        out = wire.decode_ndarray(data)
    except DECODE_ERRORS:
        return
    assert isinstance(out, np.ndarray)


@st.composite
def ndarray_payloads(draw):
    """Payloads with a plausible header: a dtype (sometimes not allowed), dims
    (sometimes huge or too many) and a data part of about the right length."""
    typestr = draw(st.sampled_from(TYPESTRS) | st.sampled_from(["<c8", ">f4", "", "f4", "\xff"]))
    ts = typestr.encode("latin-1")
    ndim = draw(st.integers(0, 3) | st.integers(0, 40))
    dims = draw(st.lists(st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2**32 - 1),
                         min_size=ndim, max_size=ndim))
    itemsize = wire.ALLOWED_DTYPES[typestr].itemsize if typestr in wire.ALLOWED_DTYPES else 4
    count = 1
    for d in dims:
        count *= d
    exact = count * itemsize
    size = draw(st.sampled_from([exact, exact + 1, max(exact - 1, 0), 0]) if exact <= 4096
                else st.integers(0, 64))
    head = bytes([len(ts)]) + ts + bytes([ndim]) + b"".join(struct.pack(">I", d) for d in dims)
    cut = draw(st.none() | st.integers(0, len(head)))
    payload = head + bytes(size) if cut is None else head[:cut]
    return payload, dims, itemsize


@FAST
@given(ndarray_payloads())
def test_decode_ndarray_on_structured_payloads(case):
    payload, dims, itemsize = case
    try:
        out = wire.decode_ndarray(payload)
    except DECODE_ERRORS:
        return
    assert out.shape == tuple(dims) and out.dtype.itemsize == itemsize


def test_decode_ndarray_zero_size_with_overflowing_dims():
    payload = b"\x03<f4\x03" + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1)
    with pytest.raises(LimitExceededError, match="too large"):
        wire.decode_ndarray(payload)


def test_unknown_extension_type_is_malformed():
    unpack = wire.make_unpacker()
    with pytest.raises(MalformedFrameError, match="extension type 5"):
        unpack(msgpack.packb([1, 2, msgpack.ExtType(5, b"xyz")]))


# --------------------------------------------------------------------- make_unpacker
@FAST
@given(st.binary(max_size=300))
def test_unpacker_maps_garbage_to_typed_errors(data):
    try:
        wire.make_unpacker()(data)
    except DECODE_ERRORS:
        pass


@FAST
@given(messages, st.data())
def test_unpacker_on_damaged_messages(msg, data):
    body = bytearray(wire.pack(msg))
    action = data.draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    pos = data.draw(st.integers(0, len(body) - 1))
    if action == "truncate":
        del body[pos:]
    elif action == "flip":
        body[pos] ^= data.draw(st.integers(1, 255))
    elif action == "insert":
        body[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        body += data.draw(st.binary(min_size=1, max_size=8))
    limits = wire.DecodeLimits(max_str_len=64, max_bin_len=64, max_array_len=64, max_map_len=16,
                               max_ext_len=256)
    try:
        wire.make_unpacker(limits)(bytes(body))
    except DECODE_ERRORS:
        pass


@FAST
@given(messages)
def test_unpacker_round_trips_valid_messages(msg):
    out = wire.make_unpacker()(wire.pack(msg))
    assert len(out) == len(msg)
    for a, b in zip(out, msg):
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        else:
            assert a == b


def _limited(kind: str, n: int):
    """A message with one item of ``kind`` and size ``n``, and the size the
    limit is compared with."""
    if kind == "str":
        return ["x" * n], n
    if kind == "bin":
        return [b"x" * n], n
    if kind == "array":
        return [list(range(n))], max(n, 1)  # the message array itself has 1 item
    if kind == "map":
        return [{f"k{i}": i for i in range(n)}], n
    return [np.zeros(n, np.uint8)], 9 + n  # ext: 1 + 3 ("|u1") + 1 + 4 header bytes


@FAST
@given(st.sampled_from(["str", "bin", "array", "map", "ext"]), st.integers(0, 40), st.integers(0, 60))
def test_unpacker_respects_each_limit(kind, n, limit):
    msg, size = _limited(kind, n)
    limits = wire.DecodeLimits(**{f"max_{kind}_len": limit})
    unpack = wire.make_unpacker(limits)
    body = wire.pack(msg)
    if size > limit:
        with pytest.raises(LimitExceededError):
            unpack(body)
    else:
        out = unpack(body)
        assert len(out) == 1


def test_nesting_limit():
    unpack = wire.make_unpacker()
    # 1024 nested arrays or maps (the message array included) decode; 1025 do not.
    assert unpack(b"\x91" * 1024 + b"\xc0") is not None
    assert unpack(b"\x81\xa1k" * 1024 + b"\xc0") is not None
    with pytest.raises(LimitExceededError, match="more than 1024 levels"):
        unpack(b"\x91" * 1025 + b"\xc0")
    with pytest.raises(LimitExceededError):
        unpack(b"\x81\xa1k" * 1025 + b"\xc0")


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x92\x01", b"\x93\x01\x02\x03\x04", b"\x81\x01\x02", b"\xd9\x05ab",
    b"\xc7\x02\x01\x03x", b"\xa2\xff\xfe",
], ids=["empty", "never-used", "truncated", "extra-data", "int-key", "short-str", "bad-ndarray",
        "bad-utf8"])
def test_unpacker_known_malformed_bodies(body):
    with pytest.raises(MalformedFrameError):
        wire.make_unpacker()(body)


# --------------------------------------------------------------------- FrameReader
def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, prev = [], 0
    for p in points + [len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def _feed_all(reader, chunks, kind="bytes") -> list:
    out = []
    for chunk in chunks:
        if kind == "bytearray":
            chunk = bytearray(chunk)
        elif kind == "memoryview":
            chunk = memoryview(chunk)
        # Items may be views onto the chunk: copy before the next feed.
        out += [item if type(item) is int else bytes(item) for item in reader.feed(chunk)]
    return out


chunk_kinds = st.sampled_from(["bytes", "bytearray", "memoryview"])


@IMPLS
@FAST
@given(st.lists(st.binary(max_size=80), max_size=20), st.lists(st.integers(0, 2000), max_size=30),
       chunk_kinds)
def test_any_split_yields_the_same_frames(impl, bodies, cuts, kind):
    stream = b"".join(framing_py.pack_frame(b) for b in bodies)
    reader = impl.FrameReader(1 << 20)
    assert _feed_all(reader, _split(stream, cuts), kind) == bodies
    assert reader.buffered == 0


@IMPLS
@FAST
@given(st.integers(1, 32), st.lists(st.binary(max_size=64), max_size=15),
       st.lists(st.integers(0, 1500), max_size=30), chunk_kinds)
def test_oversized_frames_yield_their_length_and_the_stream_stays_in_step(impl, limit, bodies, cuts, kind):
    stream = b"".join(framing_py.pack_frame(b) for b in bodies)
    reader = impl.FrameReader(limit)
    expected = [b if len(b) <= limit else len(b) for b in bodies]
    assert _feed_all(reader, _split(stream, cuts), kind) == expected
    assert reader.buffered == 0


@IMPLS
def test_an_oversized_body_is_skipped_without_buffering(impl):
    reader = impl.FrameReader(16)
    assert reader.feed(struct.pack(">I", 1 << 30)) == [1 << 30]
    garbage = bytes(1 << 16)
    for _ in range((1 << 30) // len(garbage)):
        assert reader.feed(garbage) == []
        assert reader.buffered == 0
    assert [bytes(b) for b in reader.feed(framing_py.pack_frame(b"next"))] == [b"next"]


@IMPLS
def test_reader_refuses_a_nonpositive_limit(impl):
    for bad in (0, -1):
        with pytest.raises(ValueError):
            impl.FrameReader(bad)


@IMPLS
def test_reader_partial_frame_is_buffered(impl):
    reader = impl.FrameReader(100)
    frame = framing_py.pack_frame(b"0123456789")
    assert reader.feed(frame[:2]) == [] and reader.buffered == 2
    assert reader.feed(frame[2:9]) == [] and reader.buffered == 5
    assert [bytes(b) for b in reader.feed(frame[9:])] == [b"0123456789"]
    assert reader.buffered == 0


@FAST
@given(st.integers(1, 48), st.lists(st.binary(max_size=64), max_size=12),
       st.lists(st.integers(0, 1200), max_size=30), chunk_kinds)
def test_buffered_and_mid_frame_agree_between_the_twins(limit, bodies, cuts, kind):
    """The msgpack port charges ``buffered`` to max_partial_frame_bytes and times ``mid_frame`` against
    header_timeout_ms: both implementations must say the same after every read, and say the truth."""
    stream = b"".join(framing_py.pack_frame(b) for b in bodies)
    boundaries = {0}
    pos = 0
    for b in bodies:
        pos += 4 + len(b)
        boundaries.add(pos)
    native, pure = framing_native.FrameReader(limit), framing_py.FrameReader(limit)
    fed = 0
    for chunk in _split(stream, cuts):
        got = []
        for reader in (native, pure):
            data = {"bytes": chunk, "bytearray": bytearray(chunk), "memoryview": memoryview(chunk)}[kind]
            items = [i if type(i) is int else bytes(i) for i in reader.feed(data)]
            got.append((items, reader.buffered, reader.mid_frame))
        assert got[0] == got[1]
        fed += len(chunk)
        _, buffered, mid = got[0]
        assert mid == (fed not in boundaries)  # a frame has begun and not ended
        assert buffered <= 4 + limit and (mid or buffered == 0)  # an oversized body is never held
    assert not native.mid_frame and native.buffered == 0


@IMPLS
def test_reader_limit_of_4_gib_or_more(impl):
    reader = impl.FrameReader(2**32)
    assert [bytes(b) for b in reader.feed(framing_py.pack_frame(b"abc"))] == [b"abc"]


# --------------------------------------------------------------------- pack_frame, assemble_batch
@FAST
@given(st.binary(max_size=300), st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_pack_frame_equals_its_twin(body, kind):
    arg = {"bytes": body, "bytearray": bytearray(body), "memoryview": memoryview(body)}[kind]
    expected = struct.pack(">I", len(body)) + body
    assert framing_native.pack_frame(arg) == framing_py.pack_frame(arg) == wire.frame(body) == expected


@FAST
@given(st.integers(0, 24), st.integers(0, 8), st.data())
def test_assemble_batch_equals_its_twin(item_nbytes, count, data):
    items = []
    for _ in range(count):
        raw = data.draw(st.binary(min_size=item_nbytes, max_size=item_nbytes))
        if data.draw(st.booleans()):
            items.append(raw)
        else:
            items.append(np.frombuffer(raw, np.uint8).copy())
    native = framing_native.assemble_batch(items, item_nbytes)
    pure = framing_py.assemble_batch(items, item_nbytes)
    assert type(native) is type(pure) is bytearray
    assert native == pure == b"".join(bytes(memoryview(x)) for x in items)


@pytest.mark.parametrize("impl", [framing_py, framing_native], ids=["python", "native"])
def test_assemble_batch_refuses_a_wrong_size(impl):
    with pytest.raises(ValueError, match="3 bytes"):
        impl.assemble_batch([b"abcd", b"abc"], 4)
    batch = impl.assemble_batch([np.arange(2, dtype="<f4"), np.arange(2, 4, dtype="<f4")], 8)
    assert np.array_equal(np.frombuffer(batch, "<f4"), np.arange(4, dtype="<f4"))


@FAST
@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20)), max_size=12))
def test_assemble_varlen_equals_its_twin_and_splits_back(items):
    from clipper.container.runtime import split_varlen

    native = framing_native.assemble_varlen(items)
    pure = framing_py.assemble_varlen(items)
    assert type(native) is type(pure) is bytearray and native == pure
    raw = [x.encode() if isinstance(x, str) else x for x in items]
    offsets = np.frombuffer(native, "<u8", count=len(items) + 1)
    assert offsets[0] == 0 and list(np.diff(offsets)) == [len(r) for r in raw]
    assert bytes(native[8 * (len(items) + 1):]) == b"".join(raw)
    assert split_varlen(native, len(items), False) == raw
    if all(isinstance(x, str) for x in items):
        assert split_varlen(native, len(items), True) == items


@IMPLS
def test_assemble_varlen_refuses_other_kinds(impl):
    with pytest.raises(TypeError, match="bytes or str, not int"):
        impl.assemble_varlen([b"a", 3])


def test_split_varlen_refuses_a_short_payload():
    from clipper.container.runtime import split_varlen

    buf = framing_native.assemble_varlen([b"abc", b"de"])
    with pytest.raises(ValueError, match="declares 5 bytes of data and carries 4"):
        split_varlen(buf[:-1], 2, False)


def test_pack_is_safe_from_many_threads():
    # Each thread packs distinct messages at once; every body must decode to
    # exactly what that thread packed (a shared Packer would interleave them).
    import threading

    unpack = wire.make_unpacker()
    failures = []
    start = threading.Barrier(4)

    def work(t):
        start.wait()
        for i in range(2000):
            msg = wire.predict(i, f"app-{t}", np.full(64, t, dtype=np.float32))
            out = unpack(wire.pack(msg))
            if out[1] != i or out[2] != f"app-{t}" or not (out[3] == t).all():
                failures.append((t, i))
                return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@IMPLS
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), json_like, st.booleans(),
       st.none() | st.dictionaries(st.text(max_size=8), json_like, max_size=4))
def test_result_frame_is_the_packed_message(impl, req_id, query_id, output, is_default, extra):
    msg = [wire.RESULT, req_id, query_id, output, is_default] + ([] if extra is None else [extra])
    expected = framing_py.pack_frame(wire.pack(msg))
    got = impl.result_frame(req_id, query_id, wire.pack(output), is_default,
                            None if extra is None else wire.pack(extra))
    assert got == expected
    assert wire.make_unpacker()(got[4:]) == msg


def test_packed_extra_is_a_dict_carrying_its_encoding():
    e = wire.PackedExtra(confidence=1.0, models=["m:1"])
    assert e == {"confidence": 1.0, "models": ["m:1"]} and e.packed == wire.pack({"confidence": 1.0, "models": ["m:1"]})
    assert wire.pack([1, e]) == wire.pack([1, dict(e)])


# ------------------------------------------------------------ a container's output block
@settings(max_examples=300, deadline=None)
@given(typestr=st.sampled_from(sorted(wire.ALLOWED_DTYPES)), n=st.integers(1, 40), cols=st.integers(0, 3),
       seed=st.integers(0, 2**32 - 1), cut=st.integers(-3, 3))
@example(typestr="<f4", n=30, cols=0, seed=9337, cut=0)  # a signalling NaN among the 30
def test_an_output_block_reads_as_numpy_reads_it(typestr, n, cols, seed, cut):
    # The RPC reads a one-dimensional block with memoryview.cast (no numpy): the same Python values, of the
    # same types, as numpy's tolist(); other shapes go through numpy. A block whose size is not the shape's
    # is refused either way (ValueError or TypeError, which the RPC turns into the batch's ModelError).
    from clipper.rpc.server import ndarray_outputs

    dtype = wire.ALLOWED_DTYPES[typestr]
    shape = [n] if cols == 0 else [n, cols]
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    block = raw.tobytes()
    if cut:
        block = block[:cut] if cut < 0 else block + bytes(cut)
        with pytest.raises((ValueError, TypeError)):
            ndarray_outputs(block, dtype, typestr, shape)
        return
    got = ndarray_outputs(block, dtype, typestr, shape)
    want = np.frombuffer(block, dtype=dtype).reshape(shape)
    assert len(got) == n
    if cols == 0:
        ref = want.tolist()
        assert [type(v) for v in got] == [type(v) for v in ref]
        # (compared by their bits, as numpy's tolist gives them: a signalling NaN comes back quiet either way)
        assert np.array_equal(np.array(got, dtype=dtype).view(np.uint8), np.array(ref, dtype=dtype).view(np.uint8))
    else:
        assert all(np.array_equal(g, w, equal_nan=dtype.kind == "f") for g, w in zip(got, want))


@settings(max_examples=300, deadline=None)
@given(typestr=st.sampled_from(sorted(wire.ALLOWED_DTYPES)), n=st.integers(0, 30), cols=st.integers(0, 3),
       step=st.integers(1, 3), fortran=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_a_containers_output_array_reaches_the_frontend_as_it_was(typestr, n, cols, step, fortran, seed):
    # The container sends an array of outputs as its raw bytes (memoryview.cast, no copy when it is
    # C-contiguous, one copy when it is a strided or Fortran-ordered view): the frontend's reader sees the
    # array predict returned, value for value, whatever its layout.
    from clipper.container.runtime import encode_outputs
    from clipper.rpc import messages as m
    from clipper.rpc.server import ndarray_outputs

    dtype = wire.ALLOWED_DTYPES[typestr]
    shape = (n * step,) if cols == 0 else (n * step, cols)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    base = raw.view(dtype).reshape(shape)
    if fortran and cols:
        base = np.asfortranarray(base)
    out = base[::step]  # a view: strided when step > 1
    if n == 0:
        from clipper.errors import WrongOutputCountError

        with pytest.raises(WrongOutputCountError):  # no outputs for a batch of one input
            encode_outputs(5, out[:0], 1)
        return
    header, block = encode_outputs(5, out, n)
    kind, batch_id, count, encoding, (ts, got_shape) = msgpack.unpackb(header)
    assert (kind, batch_id, count, encoding, ts, got_shape) == (m.C_RESULT, 5, n, m.ENC_NDARRAY, typestr, list(out.shape))
    assert bytes(block) == out.tobytes()
    got = ndarray_outputs(block, dtype, ts, got_shape)
    want = np.ascontiguousarray(out)
    assert len(got) == n
    if cols:  # (compared by their bits: NaNs of any payload are equal)
        assert all(np.array_equal(g.view(np.uint8), w.view(np.uint8)) for g, w in zip(got, want))
    else:
        ref = want.tolist()  # (a signalling NaN comes back quiet from tolist too: compared as numpy gives it)
        assert np.array_equal(np.array(got, dtype=dtype).view(np.uint8), np.array(ref, dtype=dtype).view(np.uint8))


# ------------------------------------------------------------------ counting objects before decoding
_objects = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False, width=32),
              st.text(max_size=40), st.binary(max_size=300)),
    lambda inner: st.one_of(st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=5), inner, max_size=6)),
    max_leaves=60)


def _n_objects(obj) -> int:
    if isinstance(obj, list):
        return 1 + sum(_n_objects(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(_n_objects(k) + _n_objects(v) for k, v in obj.items())
    return 1


@IMPLS
@given(obj=_objects, single_float=st.booleans(), cut=st.integers(1, 8))
@example(obj=[[]] * 20, single_float=False, cut=1)
def test_count_objects_counts_what_a_decoder_would_build(impl, obj, single_float, cut):
    body = msgpack.packb(obj, use_bin_type=True, use_single_float=single_float)
    n = _n_objects(obj)
    assert impl.count_objects(body, 0, 10**9) == n
    assert impl.count_objects(body, 0, n) == n and impl.count_objects(body, 0, n - 1) == n  # (limit + 1)
    assert impl.count_objects(b"\x00" + body, 1, 10**9) == n
    if len(body) > cut:  # cut short: -1 (the decoder says why), unless the limit is passed first
        got = impl.count_objects(body[:-cut], 0, 10**9)
        assert got == -1 or got == n  # (the cut fell past the end of the one object it reads: a str's bytes)


@given(st.binary(max_size=200), st.integers(0, 50))
def test_both_counters_agree_on_any_bytes(data, limit):
    assert framing_py.count_objects(data, 0, limit) == framing_native.count_objects(data, 0, limit)


def test_an_unpacker_refuses_a_frame_that_would_decode_into_more_objects_than_its_limit():
    unpack = wire.make_unpacker(wire.DecodeLimits(max_objects=1000))
    nested = msgpack.packb([[[] for _ in range(100)] for _ in range(11)])  # 1,112 objects in 1,124 bytes
    with pytest.raises(LimitExceededError, match="more than 1000 msgpack objects"):
        unpack(nested)
    flat = msgpack.packb([1.5] * 500)  # 501 objects in 4,503 bytes: counted, and taken
    assert unpack(flat) == [1.5] * 500
    assert unpack(msgpack.packb([[]] * 999)) == [[]] * 999  # 1,000 objects: the limit itself
    for impl in (framing_py, framing_native):  # an array travels as one ext: one object, whatever its size
        assert impl.count_objects(wire.pack([np.zeros(3), np.zeros((300, 2)), {"k": np.zeros(1)}]), 0, 99) == 6
