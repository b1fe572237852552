"""The REST port's native body parser (``framing.json_vector``): a body that is exactly
``{"input": [n numbers]}`` becomes the application's float array without a Python object per number.

Whatever it takes it must turn into the same bits as the full way (orjson, then ``floats_to_array``),
and whatever it leaves (None) the full way judges as before; the native parser and its twin agree on
every body.
"""

from __future__ import annotations

import http.client as httpc
import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from clipper._native import _framing as native
from clipper._native import framing_py as twin

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

_ws = st.sampled_from(["", " ", "\n", "\t", "\r\n  ", "\x0b", "\x0c"])  # the last two are not JSON's
_number = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: f"{f:.9g}"),
    st.integers(-(10**17), 10**17).map(str),
    st.sampled_from(["-0", "0", "-0.0", "1e999", "-1e400", "1E5", "1e-400", "01", "1.", ".5", "+1", "1e", "1e+",
                     "NaN", "Infinity", "-", "0x10", "1_0", "\"1\"", "true", "null", "[1]", "9007199254740993",
                     "123456789012345", "1234567890123456", "-999999999999999"]),
)


@st.composite
def _bodies(draw):
    items = draw(st.lists(_number, max_size=6))
    w = [draw(_ws) for _ in range(8)]
    key = draw(st.sampled_from(['"input"', '"input"', '"input"', '"inputs"', '"\\u0069nput"', "input"]))
    body = f'{w[0]}{{{w[1]}{key}{w[2]}:{w[3]}[{w[4]}' + f"{w[5]},{w[5]}".join(items) + f"{w[6]}]{w[7]}}}"
    extra = draw(st.sampled_from(["", "", "", ', "user": "u"', ', "input": [1]', "x", "]"]))
    if extra:
        body = body[:-1] + extra + "}" if extra.startswith(",") else body + extra
    return body.encode(), len(items)


def _full_way(raw: bytes, dt):
    """What the REST port makes of the body without the native parser (None: not a plain vector)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or list(data) != ["input"] or type(data["input"]) is not list:
        return None
    return native.floats_to_array(data["input"], dt)


@settings(max_examples=1500, deadline=None)
@given(body=_bodies(), dt=st.sampled_from([F32, F64]), off=st.sampled_from([0, 0, 0, 1, -1]))
def test_the_native_parser_takes_only_plain_vectors_and_makes_the_full_ways_bits(body, dt, off):
    """(Mutations caught here: accepting ``\\x0b`` as whitespace, a leading zero, an integer of 16 digits,
    ``-0`` parsed as -0.0, a count past ``n``, a second key.)"""
    raw, count = body
    n = count + off
    a, b = native.json_vector(raw, dt, n), twin.json_vector(raw, dt, n)
    assert (a is None) == (b is None), raw
    if a is None:
        return
    want = _full_way(raw, dt)
    assert want is not None, raw  # taken natively only what the full way takes as a plain vector
    assert a.dtype == dt and a.shape == (n,) and a.flags.c_contiguous and a.flags.writeable
    assert a.tobytes() == want.tobytes() == b.tobytes(), raw


@pytest.mark.parametrize("impl", [native, twin], ids=["native", "twin"])
def test_what_it_leaves_to_the_full_way(impl):
    body = b'{"input": [1, 2.5, -0, 3e2]}'
    assert impl.json_vector(body, F32, 4).tolist() == [1.0, 2.5, 0.0, 300.0]
    assert np.signbit(impl.json_vector(b'{"input":[-0.0]}', F64, 1)[0])  # a float -0.0 keeps its sign
    assert not np.signbit(impl.json_vector(b'{"input":[-0]}', F64, 1)[0])  # an integer -0 is 0
    for raw, n in [(body, 3), (body, 5), (b'{"input": []}', 0), (bytearray(body), 4),
                   (b'{"input": [1e999]}', 1), (b'{"input": [01]}', 1), (b'{"input": [1]} x', 1),
                   (b'{"input": [1], "user": "u"}', 1), (b'{"input": [1234567890123456]}', 1)]:
        assert impl.json_vector(raw, F32, n) is None, raw
    assert impl.json_vector(body, np.dtype(np.int32), 4) is None


def test_rest_answers_the_same_through_either_parser(frontend):
    """End to end: plain vectors (the native parser), the same numbers with a second key (the full way)
    and a near miss that only the full way can judge all get their usual answers."""
    frontend.deploy("sum", "row_sum")  # float32[4] -> the sum of the row
    conn = httpc.HTTPConnection("127.0.0.1", frontend.fe.rest_port, timeout=30)

    def post(body: bytes):
        conn.request("POST", "/sum/predict", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    for body in (b'{"input": [1, 2.5, -0, 3e2]}', b'{"input": [1, 2.5, -0, 3e2], "user": "u1"}',
                 b' {\n"input" : [ 1 , 2.5,-0,3e2 ] }\n'):
        status, out = post(body)
        assert status == 200 and out["output"] == pytest.approx(303.5) and not out["default"], body
    status, out = post(b'{"input": [1, 2, 3]}')  # the wrong count: the full way's shape error
    assert status == 400 and out["error"]["name"] == "SHAPE_MISMATCH"
    status, out = post(b'{"input": [1, 2, 3, 01]}')  # not JSON: the full way's error
    assert status == 400 and out["error"]["name"] == "INVALID_INPUT"
    route = frontend.fe.processor.routes["sum"]
    assert route.answered == 3 and route.errors == 1  # (invalid JSON is refused before the query counts)
