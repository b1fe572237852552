"""Inputs of any length: a shape with a free dimension (-1), the original Clipper's vectors."""

from __future__ import annotations

import numpy as np
import pytest

from clipper import Client
from clipper import errors as E
from clipper.management.registry import Application, check_shape


def test_a_free_dimension_is_valid_and_zero_is_not():
    """Catches: check_shape refusing -1 (no variable-length applications) or accepting 0 / -2 with it."""
    assert check_shape("float64", [-1]) == (-1,)
    assert check_shape("int32", (3, -1)) == (3, -1)
    for bad in ([0], [-2], [-1, 0]):
        with pytest.raises(E.InvalidConfigError):
            check_shape("float64", bad)
    Application("v", "float64", [-1])


def test_vectors_of_any_length_over_msgpack_in_one_batch(frontend):
    """Catches: a batch of inputs of different lengths assembled as one fixed-size block (wrong sums or a
    failed batch), the msgpack fast paths refusing a length other than the first, or a wrong dimension count
    accepted."""
    frontend.deploy("vsum", "vec_sum", dtype="float64", shape=(-1,), max_batch=16)
    xs = [np.arange(n, dtype=np.float64) for n in (1, 5, 2, 30, 0)]
    with Client("127.0.0.1", frontend.port) as c:
        ps = c.predict_many("vsum", xs)
        assert [p.output for p in ps] == [float(x.sum()) for x in xs]
        assert c.predict("vsum", [1, 2, 3.5]).output == 6.5  # a list, converted
        with pytest.raises(E.ShapeMismatchError):
            c.predict("vsum", np.zeros((2, 2)))
        with pytest.raises(E.DTypeMismatchError):
            c.predict("vsum", np.zeros(3, dtype=np.float32))


def test_variable_inputs_are_bounded_by_max_input_bytes(frontend_factory):
    """Catches: a free dimension that lets an input past max_input_bytes."""
    fe = frontend_factory(max_input_bytes=800)
    fe.deploy("vsum", "vec_sum", dtype="float64", shape=(-1,))
    with Client("127.0.0.1", fe.port) as c:
        assert c.predict("vsum", np.ones(100)).output == 100.0
        with pytest.raises(E.InputTooLargeError):
            c.predict("vsum", np.ones(101))
        with pytest.raises(E.InputTooLargeError):
            c.predict("vsum", [1.0] * 101)


# ------------------------------------------------------------------ batches of such inputs: one buffer ("vl")
def test_array_batches_are_one_buffer_of_offsets_shapes_and_data():
    """Catches: the native and pure assemblers disagreeing, or the container's split copying or misplacing
    an item (each must be a read-only view of the one payload, back to back)."""
    import importlib

    from clipper._native import framing_py
    from clipper.container.runtime import split_arrays

    native = importlib.import_module("clipper._native._framing")
    items = [np.arange(n * 3, dtype="<f4").reshape(n, 3) for n in (2, 0, 5, 1)]
    items.append(np.arange(12, dtype="<f4").reshape(3, 4)[:, :3])  # not contiguous: sent in C order
    buf = native.assemble_arrays(items, 2)
    assert bytes(buf) == bytes(framing_py.assemble_arrays(items, 2))
    offsets = np.frombuffer(buf, "<u8", count=6)
    assert list(offsets) == [0, 24, 24, 84, 96, 132]
    assert list(np.frombuffer(buf, "<u8", count=10, offset=48)) == [2, 3, 0, 3, 5, 3, 1, 3, 3, 3]
    payload = bytes(buf)
    out = split_arrays(payload, 5, "<f4", 2)
    for x, got in zip(items, out):
        assert got.shape == x.shape and np.array_equal(got, x) and not got.flags.writeable
        assert np.shares_memory(got, np.frombuffer(payload, np.uint8)) or got.size == 0
    for bad in (payload[:-4], payload + b"\0\0\0\0", payload[:40]):
        with pytest.raises(ValueError):
            split_arrays(bad, 5, "<f4", 2)
    with pytest.raises(ValueError):
        split_arrays(payload, 5, "<f8", 2)  # the shapes then need other lengths
    with pytest.raises(ValueError):
        split_arrays(payload, 5, "object", 2)


@pytest.mark.parametrize("shape, xs", [
    ((-1,), [np.arange(n, dtype=np.float32) for n in (3, 1, 0, 7, 2)]),
    ((-1, 3), [np.ones((n, 3), dtype=np.float32) * n for n in (1, 4, 2)]),
    ((2, -1, -1), [np.ones((2, a, b), dtype=np.float32) for a, b in ((1, 1), (3, 2), (0, 5))]),
])
def test_variable_arrays_reach_the_model_as_views_of_one_buffer(frontend, shape, xs):
    """Catches: variable-length batches still travelling as a msgpack list (each item decoded into an array
    of its own), or items reaching the model with the wrong shape: a real container gets a list of numpy
    views lying back to back in the one payload."""
    frontend.deploy("probe", "varlen_probe", dtype="float32", shape=shape, max_batch=16, batch_delay_ms=20.0,
                    cache=False)
    with Client("127.0.0.1", frontend.port) as c:
        outs = [p.output for p in c.predict_many("probe", xs)]
    for x, out in zip(xs, outs):
        assert out == f"list float32 {list(x.shape)} view {float(x.sum())}", out
