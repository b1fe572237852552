"""The rules of docs/protocol.md that a client once had to guess (issue 12), each held on a live server:
the order of the input checks (msgpack's native prescan, the decoder's path and REST agree), duplicate
in-flight ids, HELLO, the pending limit, FEEDBACK labels per output kind."""

from __future__ import annotations

import http.client as httpc
import importlib
import json
import random

import numpy as np
import pytest

from clipper import errors as E
from clipper._native import framing_py as twin
from clipper.management.registry import Application
from clipper.protocol import wire
from clipper.query.processor import AppRoute, QueryProcessor

native = importlib.import_module("clipper._native._framing")


def _code(msg):
    assert msg[0] == wire.ERROR, msg
    return msg[2]


def _rest(port: int, path: str, body) -> tuple[int, dict]:
    conn = httpc.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


# ------------------------------------------------------------------ the order of the input checks
# (input, application shape, the code of the first rule it breaks); max_input_bytes is 64, float32
ORDER_CASES = [
    ([[1, 2], [3]], (2, 2), 201),                 # ragged: structure, not shape
    ([[1, 2], 3], (2, 2), 201),                   # an array beside a number
    (list(range(17)), (2, 2), 205),               # too large (and the wrong shape): size first
    ([[1.5] * 9] * 2, (2, 2), 205),               # too large, ragged-free, wrong shape
    ([["a", 1], [2]], (2, 2), 201),               # ragged and not numbers: structure before dtype
    ([["a", 1], [2, 3]], (3,), 203),              # not numbers and the wrong shape: dtype before shape
    ([[None, 1], [2, 3]], (2, 2), 203),
    ([[{"k": 1}, 1], [2, 3]], (2, 2), 203),       # a map where a number is: not a number
    ([1, 2, 3], (2, 2), 204),
    ([[1, 2], [3, 4]], (4,), 204),                # regular, deeper than the application's shape
    ([1, 2, 3, 4], (-1, 2), 204),
    ([[1, 2], [3, 4], [5, 6]], (-1, 2), None),   # a free dimension takes any length
    ([], (-1,), None),
    ([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], (1,), 201),  # 33 arrays deep
]


@pytest.mark.parametrize("x, shape, code", ORDER_CASES)
def test_the_first_broken_rule_wins_on_every_path(frontend_factory, wire_conn, x, shape, code):
    """Catches: the native prescan, the decoder's path and REST judging one input differently (a ragged list
    as 204, dtype after shape, an oversized list as 204): each gives the error of the first rule broken in
    the order of section 4, or takes the input."""
    fe = frontend_factory(max_input_bytes=64)
    fe.deploy("a", "vec_sum", dtype="float32", shape=shape)
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "a", x))  # the head fast path: the native prescan judges the list's bytes
    c.send(wire.predict(2, "a", x, {"user": "u"}))  # with options: the same rules
    status, body = _rest(fe.fe.rest_port, "/a/predict", {"input": x})  # decoded by JSON: the Python rules
    out = {m[1]: m for m in c.recv(2)}
    if code is None:
        assert out[1][0] == out[2][0] == wire.RESULT and status == 200, (out, body)
        return
    assert _code(out[1]) == _code(out[2]) == code, out
    assert status == 400 and body["error"]["code"] == code, body


@pytest.mark.parametrize("x, shape, code", ORDER_CASES)
def test_python_and_native_judges_agree(x, shape, code):
    """The Python walk of a decoded list and the native walk of its bytes give one verdict."""
    import msgpack

    body = msgpack.packb([1, 1, "a", x])
    head = native.request_head(body)
    got = native.check_nested(body, head[3], shape, 4, 64, False)
    assert got == twin.check_nested(body, head[3], shape, 4, 64, False) == twin.judge_list(x, shape, 4, 64, False)
    assert (got[0] if got else None) == code


def test_an_array_input_is_judged_size_then_dtype_then_shape(frontend_factory, wire_conn):
    fe = frontend_factory(max_input_bytes=64)
    fe.deploy("a", "vec_sum", dtype="float32", shape=(4,))
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "a", np.zeros(9, dtype=np.float64)))  # 72 bytes, wrong dtype, wrong shape
    c.send(wire.predict(2, "a", np.zeros(3, dtype=np.float64)))  # wrong dtype and shape
    c.send(wire.predict(3, "a", np.zeros(3, dtype=np.float32)))
    c.send(wire.predict(4, "a", "text"))
    out = {m[1]: _code(m) for m in c.recv(4)}
    assert out == {1: 205, 2: 203, 3: 204, 4: 201}


# ------------------------------------------------------------------ duplicate in-flight ids
@pytest.fixture
def slow(frontend_factory):
    fe = frontend_factory(max_pending_per_connection=3)
    fe.deploy("slow", "row_sum_after_sleep", env={"CLIPPER_TEST_SLEEP_S": "0.4"}, cache=False)
    return fe


def test_a_duplicate_id_is_refused_on_every_path_and_the_first_request_still_answers(slow, wire_conn):
    """Catches: two in-flight requests under one id both answered (the array fast path, the decoder's path,
    FEEDBACK, PING), or the refusal disturbing the first request."""
    x = np.arange(4, dtype=np.float32)
    c = wire_conn(slow.port)
    c.send(wire.predict(7, "slow", x))                 # the array fast path: held for 0.4 s
    c.send(wire.predict(7, "slow", x))                 # the array fast path again
    c.send(wire.predict(7, "slow", [1, 2, 3, 4], {"user": "u"}))  # the decoder's path
    c.send(wire.feedback(7, "slow", x, 1.0))
    c.send(wire.ping(7))
    c.send(wire.describe(7, "slow"))
    c.send(wire.hello(7))
    c.send(wire.ping(8))
    replies = c.recv(8)
    assert [_code(m) for m in replies[:6]] == [E.DuplicateRequestIdError.code] * 6
    assert all(m[1] == 7 and "still awaiting its reply" in m[4] for m in replies[:6])
    assert replies[6] == [wire.PONG, 8]
    assert replies[7][:2] == [wire.RESULT, 7] and replies[7][3] == 6.0
    c.send(wire.predict(7, "slow", x))  # answered: the id is free again
    assert c.recv(1)[0][:2] == [wire.RESULT, 7]


def test_a_duplicate_in_a_run_of_refusals_is_handed_to_python():
    """refuse_run (admission's native refusal of a run of PREDICT frames) stops at an id in flight, so that
    the duplicate gets DUPLICATE_REQUEST_ID rather than OVERLOADED under the id of a request still waiting."""
    import msgpack

    items = [msgpack.packb([1, i, "a", [1.0]]) for i in (1, 2, 3, 4)]
    tail = msgpack.packb(309) + msgpack.packb("OVERLOADED") + msgpack.packb("busy")
    for impl in (native, twin):
        ids = impl.IdSet()
        ids.add(3)
        out = bytearray()
        assert impl.refuse_run(items, 0, b"a", 1 << 20, tail, out, ids) == 2
        assert impl.refuse_run(items, 0, b"a", 1 << 20, tail, bytearray(), None) == 4


def test_the_native_id_set_is_a_set():
    """Catches: the open-addressing table losing an id on deletion (backward shift) or growth."""
    rnd = random.Random(12)
    a, b, ref = native.IdSet(), twin.IdSet(), set()
    for _ in range(50_000):
        k = rnd.choice((rnd.randrange(40), rnd.randrange(1 << 64), rnd.randrange(3000) * 1024))
        if rnd.random() < 0.55:
            assert a.add(k) == b.add(k) == (k not in ref)
            ref.add(k)
        else:
            assert a.discard(k) == b.discard(k) == (k in ref)
            ref.discard(k)
        assert len(a) == len(b) == len(ref)
    assert all(k in a for k in ref) and -1 not in a and (1 << 64) not in a and "x" not in a


# ------------------------------------------------------------------ the pending limit
def test_feedback_counts_against_the_pending_limit_and_ping_does_not(slow, wire_conn):
    x = np.arange(4, dtype=np.float32)
    c = wire_conn(slow.port)
    for i in range(3):
        c.send(wire.predict(i, "slow", x + i))  # three held: the limit
    c.send(wire.feedback(10, "slow", x, 1.0))
    c.send(wire.predict(11, "slow", x))
    c.send(wire.ping(12))
    c.send(wire.describe(13, "slow"))
    first = c.recv(4)
    assert [(m[1], _code(m) if m[0] == wire.ERROR else m[0]) for m in first] == [
        (10, 105), (11, 105), (12, wire.PONG), (13, wire.DESCRIPTION)]
    assert sorted(m[1] for m in c.recv(3)) == [0, 1, 2]


# ------------------------------------------------------------------ HELLO
def test_hello_rules(frontend, wire_conn):
    """Catches: a HELLO without versions (or with a non-map info) accepted, or a later HELLO changing the
    version; a later HELLO that offers the version in use is answered as the first."""
    c = wire_conn(frontend.port)
    c.send([wire.HELLO, 1, {"client": "x"}])
    c.send([wire.HELLO, 2])
    c.send([wire.HELLO, 3, [1]])
    c.send(wire.hello(4, versions=[1]))
    c.send(wire.hello(5, versions=[2, 3]))
    c.send(wire.hello(6, versions=[3, 1]))
    out = c.recv(6)
    assert [(_code(m) if m[0] == wire.ERROR else m[0]) for m in out] == [101, 101, 101, wire.HELLO_OK, 103,
                                                                           wire.HELLO_OK]
    assert "versions" in out[0][4] and out[5][2]["version"] == 1


# ------------------------------------------------------------------ FEEDBACK labels
def _route(kind: str) -> AppRoute:
    proc = QueryProcessor(None, max_input_bytes=64)
    return AppRoute(Application("a", "float32", [4], output_kind=kind), proc)


GOOD = {
    "label": [3, 0, -2, "cat", ""],
    "probabilities": [0, 7],
    "number": [1, -2.5, 0.0, 10**6],
    "vector": [[1.0, 2], [0], np.array([1.0, 2.0]), [0.5] * 8],
    "auto": [3, "cat", 2.5, [1.0, 2.0]],
}
BAD = {
    "label": [None, True, 2.5, b"x", {"a": 1}, [1, 2], float("nan")],
    "probabilities": [-1, 2.0, "cat", [0.5, 0.5], None, True],
    "number": [float("nan"), float("inf"), "1.5", None, [1.0], b"\x00", True, {"v": 1}],
    "vector": [[], [1.0, float("nan")], [[1.0]], ["a"], [True], 1.0, None, [0.5] * 9, np.zeros((2, 2)),
               np.array(["a"]), np.array(3.0)],
    # (a 0-d array: found by the protocol fuzzer as an INTERNAL_ERROR, len() of an unsized object)
    "auto": [None, float("nan"), b"x", {"a": 1}, True, [1, "a"], [[1]], [], np.array(7, np.uint64)],
}


@pytest.mark.parametrize("kind", list(GOOD))
def test_labels_fit_the_output_kind(kind):
    route = _route(kind)
    for label in GOOD[kind]:
        route.check_label(label)
    for label in BAD[kind]:
        with pytest.raises(E.InvalidLabelError) as info:
            route.check_label(label)
        assert info.value.code == 212 and kind in info.value.message


def test_a_bad_label_is_refused_on_both_ports(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    x = [1.0, 2.0, 3.0, 4.0]
    c = wire_conn(frontend.port)
    c.send(wire.feedback(1, "sum", x, float("nan")))
    c.send(wire.feedback(2, "sum", x, {"label": 1}))
    c.send(wire.feedback(3, "sum", x, 1))
    out = {m[1]: m for m in c.recv(3)}
    assert _code(out[1]) == _code(out[2]) == 212 and out[3][0] == wire.FEEDBACK_OK
    status, body = _rest(frontend.fe.rest_port, "/sum/update", {"input": x, "label": None})
    assert status == 400 and body["error"]["code"] == 212 and body["error"]["name"] == "INVALID_LABEL"
