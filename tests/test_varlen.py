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
