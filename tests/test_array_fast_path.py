"""The msgpack port's array fast path: a PREDICT ``[1, id, app, x]`` whose ``x`` is an ndarray of exactly
the application's dtype and shape is started from a view of the frame's bytes (``framing.array_input``),
never decoded; everything else goes through the full decoder and is judged as before."""

from __future__ import annotations

import gc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clipper import errors as E
from clipper._native import _framing as native
from clipper._native import framing_py as twin
from clipper.protocol import wire

DTYPES = sorted(wire.ALLOWED_DTYPES)
_shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)


@settings(max_examples=300, deadline=None)
@given(ts=st.sampled_from(DTYPES), shape=_shapes, big=st.sampled_from([0, 1, 300, 70_000]))
def test_the_expected_head_is_how_the_encoder_begins_every_array_of_that_dtype_and_shape(ts, shape, big):
    """``ndarray_ext_head`` against msgpack's own packer, across fixext, ext8, ext16 and ext32 sizes.
    (Mutation: a wrong marker threshold, e.g. ``size < 0xFF`` for ext8, fails here.)"""
    dt = wire.ALLOWED_DTYPES[ts]
    if big:
        shape = (big,)
    arr = np.zeros(shape, dt)
    encoded = wire.pack(arr)
    head = wire.ndarray_ext_head(dt, shape)
    assert head is not None and encoded[:len(head)] == head and len(encoded) == len(head) + arr.nbytes


def _frame(req_id, app, x, options=None) -> bytes:
    return wire.pack(wire.predict(req_id, app, x, options))


_arrays = st.tuples(st.sampled_from(DTYPES), _shapes).flatmap(
    lambda t: st.builds(lambda raw: np.frombuffer(raw, wire.ALLOWED_DTYPES[t[0]]).reshape(t[1]).copy()
                        if wire.ALLOWED_DTYPES[t[0]] != np.bool_
                        else np.frombuffer(bytes(b & 1 for b in raw), np.bool_).reshape(t[1]).copy(),
                        st.binary(min_size=int(np.prod(t[1])) * wire.ALLOWED_DTYPES[t[0]].itemsize,
                                  max_size=int(np.prod(t[1])) * wire.ALLOWED_DTYPES[t[0]].itemsize)))


def _as(kind: str, body: bytes):
    if kind == "bytes":
        return body
    if kind == "bytearray":
        return bytearray(body)
    return memoryview(b"\x00\x01\x02" + body + b"\x07")[3:-1]  # a slice of a read, as FrameReader gives


@settings(max_examples=500, deadline=None)
@given(x=_arrays, route=st.tuples(st.sampled_from(DTYPES), _shapes), req_id=st.integers(0, 2**64 - 1),
       app=st.text(max_size=6), options=st.sampled_from([None, {"user": "u"}]),
       cut=st.integers(0, 40), junk=st.binary(max_size=3), as_=st.sampled_from(["bytes", "bytearray", "view"]))
def test_native_and_twin_take_exactly_the_arrays_the_full_decoder_would_accept(x, route, req_id, app, options,
                                                                               cut, junk, as_):
    """Differential: native == twin; a taken input equals what the full decoder gives and is exactly the
    route's dtype and shape; every 4-item frame with such an input is taken (no needless fallback); a
    truncated, extended or mismatched frame is never taken. (Mutations: dropping the ``offset + hlen +
    nbytes == len`` check lets the truncated/extended frames through; dropping the ``0x94`` check takes a
    frame with options.)"""
    dt, shape = wire.ALLOWED_DTYPES[route[0]], route[1]
    ext_head = wire.ndarray_ext_head(dt, shape)
    body = _frame(req_id, app, x, options)
    variants = [body, body[:len(body) - cut] if cut else body, body + junk]
    for raw in variants:
        head = native.request_head(raw)
        if head is None:
            continue
        b = _as(as_, raw)
        got_n = native.array_input(b, head[3], ext_head, dt, shape)
        got_t = twin.array_input(_as(as_, raw), head[3], ext_head, dt, shape)
        assert (got_n is None) == (got_t is None)
        try:
            msg = msgpack.unpackb(raw, ext_hook=wire._ext_hook)
        except Exception:
            msg = None
        fits = (msg is not None and len(msg) == 4 and type(msg[3]) is np.ndarray and msg[3].dtype == dt
                and msg[3].shape == shape)
        assert (got_n is not None) == fits, (raw, head)
        if got_n is not None:
            assert got_n.dtype == dt and got_n.shape == shape and not got_n.flags.writeable
            assert got_n.tobytes() == msg[3].tobytes() == got_t.tobytes()


def test_the_array_is_a_view_that_keeps_its_frame_alive_and_locks_a_bytearray():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    dt, shape = x.dtype, x.shape
    ext_head = wire.ndarray_ext_head(dt, shape)
    read = b"\x00\x00\x00\x00" + _frame(5, "m", x)
    view = memoryview(read)[4:]
    off = native.request_head(view)[3]
    arr = native.array_input(view, off, ext_head, dt, shape)
    span = np.frombuffer(read, np.uint8).ctypes.data
    assert span <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= span + len(read)  # a view: no copy
    del read, view
    gc.collect()
    assert (arr == x).all()  # the read's bytes are still alive under the array
    ba = bytearray(_frame(5, "m", x))
    arr2 = native.array_input(ba, off, ext_head, dt, shape)
    with pytest.raises(BufferError):
        ba.extend(b"more")  # a bytearray cannot move under the array
    assert (arr2 == x).all()
    del arr2
    gc.collect()
    ba.extend(b"more")  # and is free again once the array is gone


def test_a_refcount_is_neither_leaked_nor_stolen():
    import sys
    x = np.ones(784, np.float32)
    dt = np.dtype(np.float32)
    body = _frame(1, "noop", x)
    ext_head = wire.ndarray_ext_head(dt, (784,))
    off = native.request_head(body)[3]
    before = sys.getrefcount(dt), sys.getrefcount(body)
    for _ in range(5000):
        a = native.array_input(body, off, ext_head, dt, (784,))
    del a
    gc.collect()
    assert (sys.getrefcount(dt), sys.getrefcount(body)) == before


def _record(proc):
    """Which entry each PREDICT took: ``predict`` (decoded in full) or ``predict_array`` (the fast path)."""
    seen = []
    full, fast = proc.predict, proc.predict_array

    def predict(conn, req_id, *a, **kw):
        seen.append(("full", req_id))
        return full(conn, req_id, *a, **kw)

    def predict_array(conn, req_id, *a, **kw):
        seen.append(("fast", req_id))
        return fast(conn, req_id, *a, **kw)

    proc.predict, proc.predict_array = predict, predict_array
    return seen


def test_end_to_end_the_fast_path_answers_as_the_full_decoder_does(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    seen = _record(frontend.fe.processor)
    c = wire_conn(frontend.port)
    xs = [np.arange(4, dtype=np.float32) * i for i in range(20)]
    for i, x in enumerate(xs):  # even ids plain (fast path), odd ids with options (decoded in full)
        c.send(wire.predict(i, "sum", x, None if i % 2 == 0 else {"user": "u1"}))
    c.send(wire.predict(100, "sum", np.arange(4, dtype=np.float64)))  # wrong dtype: decoded, typed error
    c.send(wire.predict(101, "sum", np.arange(5, dtype=np.float32)))  # wrong shape: decoded, typed error
    c.send(wire.predict(102, "sum", [1, 2, 3, 4]))  # a list: decoded and converted
    out = {m[1]: m for m in c.recv(23)}
    for i, x in enumerate(xs):
        assert out[i][0] == wire.RESULT and not out[i][4] and out[i][3] == pytest.approx(float(x.sum()))
    assert out[100][0] == wire.ERROR and out[100][2] == E.DTypeMismatchError.code
    assert out[101][0] == wire.ERROR and out[101][2] == E.ShapeMismatchError.code
    assert out[102][0] == wire.RESULT and out[102][3] == 10.0
    paths = dict((rid, path) for path, rid in seen)
    assert {rid for rid, p in paths.items() if p == "fast"} == set(range(0, 20, 2))
    assert {rid for rid, p in paths.items() if p == "full"} == set(range(1, 20, 2)) | {100, 101, 102}
    route = frontend.fe.processor.routes["sum"]
    assert route.requests == 23 and route.answered == 21 and route.errors == 2  # both paths counted


def test_the_fast_path_keeps_the_connection_rules(frontend_factory, wire_conn, tmp_path):
    """max_pending_per_connection and draining apply to the fast path as to the full one. (The model holds
    the first batch at a gate opened once the refusals are in: no sleep for a loaded machine to outlast.)"""
    fe = frontend_factory(max_pending_per_connection=3)
    fe.deploy("slow", "gated", env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(fe.port)
    x = np.array([0.5, 1, 0, 0], np.float32)
    for i in range(5):
        c.send(wire.predict(i, "slow", x))
    refused = c.recv(2)
    (tmp_path / "gate-1").touch()
    assert sorted(m[1] for m in refused) == [3, 4] and {m[2] for m in refused} == {E.LimitExceededError.code}
    out = c.recv(3)
    assert sorted(m[1] for m in out) == [0, 1, 2] and all(m[0] == wire.RESULT and m[3] == 0.5 for m in out)


_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans())


@settings(max_examples=500, deadline=None)
@given(items=st.lists(st.one_of(_numbers, st.just("1.5"), st.none(), st.just([1.0])), max_size=12),
       dt=st.sampled_from([np.float32, np.float64, np.int32, np.float16]))
def test_a_list_of_numbers_converts_natively_exactly_as_numpy_converts_it(items, dt):
    """``floats_to_array`` (native and twin) against numpy's conversion of the same list: equal bits
    whenever it converts; None (the general path) for strings, None, nested lists, other dtypes and
    ints past a double. (Mutations: accepting a str item, or writing float64 data into a float32 array,
    fail here.)"""
    dt = np.dtype(dt)
    a, b = native.floats_to_array(items, dt), twin.floats_to_array(items, dt)
    assert (a is None) == (b is None)
    if a is None:
        assert (dt not in (np.dtype(np.float32), np.dtype(np.float64))
                or any(type(v) not in (float, int, bool) for v in items)
                or any(type(v) is int and abs(v) > 2**1023 for v in items))
        return
    with np.errstate(over="ignore"):
        want = np.array([float(v) for v in items], dtype=np.float64).astype(dt)
    assert a.dtype == dt and a.shape == (len(items),) and a.flags.c_contiguous and a.flags.writeable
    assert a.tobytes() == want.tobytes() == b.tobytes()


def test_rest_and_list_inputs_take_the_native_conversion_and_keep_their_errors(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "sum", [1, 2.5, True, 0.25]))  # ints, floats and a bool: converted
    c.send(wire.predict(2, "sum", [1, "2", 3, 4]))  # a str among them: the general path's typed error
    c.send(wire.predict(3, "sum", [1, 2, 3]))  # too short
    out = {m[1]: m for m in c.recv(3)}
    assert out[1][0] == wire.RESULT and out[1][3] == pytest.approx(4.75)
    assert out[2][0] == wire.ERROR and out[2][2] in (E.DTypeMismatchError.code, E.InvalidInputError.code)
    assert out[3][0] == wire.ERROR and out[3][2] == E.ShapeMismatchError.code


@pytest.mark.parametrize("impl", [native, twin], ids=["native", "twin"])
def test_an_input_from_a_read_of_many_frames_is_copied_so_a_waiting_query_never_pins_the_read(impl):
    """A view into a read of many frames would keep the whole read alive while its query waits in a queue
    (the byte budgets count the input, not the read): past PIN_RATIO the data is copied; a read of about one
    frame is viewed. (Mutation: always viewing fails the first assertion.)"""
    x = np.arange(784, dtype=np.float32)
    frame = _frame(3, "noop", x)
    ext_head = wire.ndarray_ext_head(x.dtype, x.shape)
    off = native.request_head(frame)[3]
    read = frame * 50  # one read of 50 frames
    arr = impl.array_input(memoryview(read)[:len(frame)], off, ext_head, x.dtype, x.shape)
    span = np.frombuffer(read, np.uint8).ctypes.data
    assert not (span <= arr.ctypes.data < span + len(read))  # its own memory
    assert (arr == x).all() and not arr.flags.writeable
    alone = frame + b"\x00" * 10  # a read of one frame and a little more: viewed
    arr2 = impl.array_input(memoryview(alone)[:len(frame)], off, ext_head, x.dtype, x.shape)
    span2 = np.frombuffer(alone, np.uint8).ctypes.data
    assert span2 <= arr2.ctypes.data < span2 + len(alone) and (arr2 == x).all()


# --------------------------------------------------------------------------- admitted runs (take_run)
_RUN_DT = np.dtype(np.float32)
_RUN_EXT = wire.ndarray_ext_head(_RUN_DT, (4,))


def _run_item(kind: str, req_id: int):
    x = np.full(4, req_id, dtype=np.float32)
    if kind == "good":
        return _frame(req_id, "a", x)
    if kind == "other_app":
        return _frame(req_id, "b", x)
    if kind == "options":
        return _frame(req_id, "a", x, {"user": "u"})
    if kind == "wrong_dtype":
        return _frame(req_id, "a", x.astype(np.float64))
    if kind == "list":
        return _frame(req_id, "a", x.tolist())
    if kind == "feedback":
        return wire.pack(wire.feedback(req_id, "a", x, 1.0))
    if kind == "memoryview":  # a slice of a larger read, as the reader hands out
        body = _frame(req_id, "a", x)
        return memoryview(b"\0" * 7 + body + b"\0" * 7)[7:7 + len(body)]
    return 1 << 30  # an oversized frame's length, as FrameReader reports it


@settings(max_examples=400, deadline=None)
@given(kinds=st.lists(st.tuples(st.sampled_from(["good"] * 6 + ["other_app", "options", "wrong_dtype", "list",
                                                                 "feedback", "memoryview", "oversized"]),
                                st.integers(0, 12)), max_size=14),
       held=st.sets(st.integers(0, 12), max_size=4), start=st.integers(0, 3), max_n=st.integers(0, 15))
def test_take_run_native_and_twin_take_the_same_frames(kinds, held, start, max_n):
    """``take_run``: the same end, ids, inputs and held ids from the native module and its twin; every
    frame taken is one the per-frame fast path would take, and no id is taken twice. (Mutations caught:
    not adding taken ids to the set, so a duplicate inside the run is taken; accepting another app.)"""
    items = [_run_item(k, i) for k, i in kinds]
    results = []
    for mod in (native, twin):
        held_set = mod.IdSet()
        for h in held:
            held_set.add(h)
        ids: list = []
        xs: list = []
        end = mod.take_run(items, start, b"a", _RUN_EXT, _RUN_DT, (4,), held_set, max_n, ids, xs)
        results.append((end, ids, [x.tobytes() for x in xs], sorted(i for i in range(13) if i in held_set)))
    assert results[0] == results[1]
    end, ids, xs, now_held = results[0]
    begin = max(start, 0)
    assert end - begin == len(ids) <= max_n and len(set(ids)) == len(ids) and not set(ids) & held
    for k, (kind, rid) in enumerate(kinds[begin:end]):
        assert kind in ("good", "memoryview") and ids[k] == rid and xs[k] == np.full(4, rid, np.float32).tobytes()
    assert set(now_held) == held | set(ids)


def test_a_pipelined_burst_is_taken_in_runs_and_answered_as_one_at_a_time(frontend, wire_conn):
    """One write of 200 frames after the model has a latency estimate: most are taken in admitted runs
    (counted), and every reply is what the per-frame path gives: the sum for plain arrays, the
    duplicate refused while its first is in flight, another application's frame and a list input
    answered in the middle of the runs. (The cache off: a cached application's frames each look in the
    cache, one at a time.)"""
    frontend.deploy("sum", "row_sum", cache=False)
    proc = frontend.fe.processor
    taken = []
    real = proc.admit_run

    def counting(conn, route, items, start):
        end = real(conn, route, items, start)
        taken.append(end - start)
        return end

    proc.admit_run = counting
    c = wire_conn(frontend.port)
    for i in range(20):  # the queue learns its batch latency: admission then holds a bound runs use
        c.send(wire.predict(10_000 + i, "sum", np.ones(4, np.float32)))
        c.recv(1)
    burst = []
    for i in range(200):
        if i == 120:
            burst.append(wire.predict(7, "sum", np.ones(4, np.float32)))  # id 7 again: still in flight?
        elif i == 150:
            burst.append(wire.predict(150, "nope", np.ones(4, np.float32)))
        elif i == 160:
            burst.append(wire.predict(160, "sum", [1.0, 2.0, 3.0, 4.0]))
        else:
            burst.append(wire.predict(i, "sum", np.arange(4, dtype=np.float32) + i))
    c.send_raw(b"".join(native.pack_frame(wire.pack(m)) for m in burst))
    out: dict = {}
    dup = []
    for m in c.recv(200):
        if m[1] == 7 and m[0] == wire.ERROR:
            dup.append(m)
        else:
            out[m[1]] = m
    for i in range(200):
        if i in (120,):
            continue
        m = out[i]
        if i == 150:
            assert m[0] == wire.ERROR and m[2] == E.UnknownApplicationError.code
        elif i == 160:
            assert m[0] == wire.RESULT and m[3] == 10.0
        else:
            assert m[0] == wire.RESULT and not m[4] and m[3] == pytest.approx(float(4 * i + 6)), m
    # id 7 sent twice in one read: the second is refused as a duplicate if the first was still in flight,
    # else answered; either way 200 replies came and nothing was lost
    assert len(dup) <= 1
    assert sum(taken) > 100, taken  # most of the burst went through runs
    route = proc.routes["sum"]
    assert route.requests == 20 + 199 - len(dup)  # every PREDICT for "sum" counted once (a duplicate is not)


def test_a_run_keeps_the_pending_limit(frontend_factory, wire_conn):
    """max_pending_per_connection holds inside an admitted run: of 120 frames in one write, 50 are taken
    and the other 70 get LIMIT_EXCEEDED (mutation caught: a run sized by the queue alone)."""
    fe = frontend_factory(max_pending_per_connection=50)
    fe.deploy("sum", "row_sum", cache=False)
    c = wire_conn(fe.port)
    for i in range(20):  # a latency estimate, so that admission holds a bound runs use
        c.send(wire.predict(10_000 + i, "sum", np.ones(4, np.float32)))
        c.recv(1)
    c.send_raw(b"".join(native.pack_frame(wire.pack(wire.predict(i, "sum", np.ones(4, np.float32))))
                        for i in range(120)))
    replies = c.recv(120)
    results = [m for m in replies if m[0] == wire.RESULT]
    limited = [m for m in replies if m[0] == wire.ERROR and m[2] == E.LimitExceededError.code]
    assert len(results) == 50 and len(limited) == 70, (len(results), len(limited))
