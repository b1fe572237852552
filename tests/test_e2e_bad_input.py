"""Every bad input gets a typed error; nothing else on the connection or server breaks."""

import struct

import msgpack
import numpy as np
import pytest

from clipper import errors as E
from clipper._native import framing
from clipper.protocol import wire

GOOD = np.arange(4, dtype=np.float32)


@pytest.fixture
def served(frontend_factory):
    fe = frontend_factory(max_frame_bytes=64 * 1024, max_input_bytes=1024, max_pending_per_connection=1000)
    fe.deploy("sum", "row_sum")
    fe.deploy("text", "reverse_bytes", dtype="str", shape=(), model="text-model")
    return fe


def _code(msg):
    assert msg[0] == wire.ERROR, msg
    return msg[2]


@pytest.mark.parametrize("bad_input, code, words", [
    (np.arange(5, dtype=np.float32), E.ShapeMismatchError.code, "has shape [5]; application 'sum' expects [4]"),
    (np.arange(4, dtype=np.float64), E.DTypeMismatchError.code, "has dtype float64; application 'sum' expects float32"),
    (np.arange(4, dtype=np.int64), E.DTypeMismatchError.code, "int64"),
    ([1, 2, 3], E.ShapeMismatchError.code, "input has shape [3]; application 'sum' expects [4]"),
    ([[1, 2], [3], 4, 5], E.InvalidInputError.code, "ragged"),
    (["a", "b", "c", "d"], E.DTypeMismatchError.code, "str"),
    ("a string", E.InvalidInputError.code, "input is a str"),
    (None, E.InvalidInputError.code, "NoneType"),
    ({"x": 1}, E.InvalidInputError.code, "dict"),
])
def test_bad_inputs(served, wire_conn, bad_input, code, words):
    c = wire_conn(served.port)
    c.send(wire.predict(1, "sum", bad_input))
    c.send(wire.predict(2, "sum", GOOD))  # the next request on the connection is fine
    out = {m[1]: m for m in c.recv(2)}
    assert _code(out[1]) == code
    assert words in out[1][4]
    assert out[2][0] == wire.RESULT and out[2][3] == 6.0


def test_unknown_application(served, wire_conn):
    c = wire_conn(served.port)
    c.send(wire.predict(1, "no-such-app", GOOD))
    msg = c.recv(1)[0]
    assert _code(msg) == E.UnknownApplicationError.code and "'no-such-app'" in msg[4]


def test_oversized_frame_is_skipped_and_the_stream_stays_in_step(served, wire_conn):
    c = wire_conn(served.port)
    big = framing.pack_frame(b"\x00" * (64 * 1024 + 1))
    c.send_raw(big + framing.pack_frame(wire.pack(wire.predict(7, "sum", GOOD))))
    first, second = c.recv(2)
    assert first[1] is None and _code(first) == E.FrameTooLargeError.code
    assert "65537 bytes exceeds max_frame_bytes=65536" in first[4]
    assert second[1] == 7 and second[3] == 6.0


def test_input_too_large(served, wire_conn):
    c = wire_conn(served.port)
    c.send(wire.predict(1, "text", "x" * 2000))
    assert _code(c.recv(1)[0]) == E.InputTooLargeError.code


@pytest.mark.parametrize("as_list", [False, True], ids=["ndarray", "list"])
def test_array_input_over_max_input_bytes(served, wire_conn, as_list):
    # 512 float32 = 2048 bytes > max_input_bytes=1024, whether it travels as an
    # ndarray or as a list of numbers; refused before any model sees it.
    served.deploy("wide", "row_sum", shape=(512,), replicas=0)
    x = np.zeros(512, dtype=np.float32)
    c = wire_conn(served.port)
    c.send(wire.predict(1, "wide", x.tolist() if as_list else x))
    msg = c.recv(1)[0]
    assert _code(msg) == E.InputTooLargeError.code
    assert "2048 bytes" in msg[4] and "max_input_bytes=1024" in msg[4]


@pytest.mark.parametrize("raw, code", [
    (b"\xc1", E.MalformedFrameError.code),  # never-used msgpack byte
    (b"\x93\x01", E.MalformedFrameError.code),  # truncated array
    (msgpack.packb({"t": 1}), E.MalformedFrameError.code),  # not an array
    (msgpack.packb([1]), E.MalformedFrameError.code),  # no id
    (msgpack.packb(["predict", 1]), E.MalformedFrameError.code),  # type not int
    (msgpack.packb([1, -5, "sum", [1]]), E.MalformedFrameError.code),  # negative id
    (b"\x91" * 2000 + b"\x90", E.LimitExceededError.code),  # nesting too deep
    (msgpack.packb([1, 1, "sum", msgpack.ExtType(9, b"x")]), E.MalformedFrameError.code),  # unknown ext
    (msgpack.packb([1, 1, "sum", msgpack.ExtType(1, b"\x03<f4\x01\x00\x00\x00\x04abc")]), E.MalformedFrameError.code),
    (msgpack.packb([1, 1, "sum", msgpack.ExtType(1, b"\x03>f4\x01\x00\x00\x00\x01abcd")]), E.MalformedFrameError.code),
])
def test_malformed_frames(served, wire_conn, raw, code):
    c = wire_conn(served.port)
    c.send_raw(framing.pack_frame(raw))
    c.send(wire.predict(9, "sum", GOOD))
    bad, good = c.recv(2)
    assert bad[1] is None and _code(bad) == code
    assert good[1] == 9 and good[3] == 6.0


def test_attributable_errors_carry_the_request_id(served, wire_conn):
    c = wire_conn(served.port)
    c.send([1, 5, 42, GOOD])  # app not a string
    c.send([1, 6])  # too short
    c.send([50, 7])  # unknown type
    out = {m[1]: m for m in c.recv(3)}
    assert _code(out[5]) == E.MalformedFrameError.code
    assert _code(out[6]) == E.MalformedFrameError.code
    assert _code(out[7]) == E.UnknownMessageTypeError.code


def test_version_negotiation(served, wire_conn):
    c = wire_conn(served.port)
    c.send(wire.hello(1, versions=[7, 8]))
    c.send(wire.hello(2, versions=[1, 7]))
    bad, ok = c.recv(2)
    assert _code(bad) == E.UnsupportedVersionError.code and "[7, 8]" in bad[4]
    assert ok[0] == wire.HELLO_OK and ok[2]["version"] == 1
    assert ok[2]["limits"]["max_frame_bytes"] == 64 * 1024


def test_ping_and_feedback(served, wire_conn):
    c = wire_conn(served.port)
    c.send(wire.ping(3))
    c.send(wire.feedback(4, "sum", GOOD, 1.0))
    c.send(wire.feedback(5, "nope", GOOD, 1.0))
    out = {m[1]: m for m in c.recv(3)}
    assert out[3][0] == wire.PONG and out[4][0] == wire.FEEDBACK_OK
    assert _code(out[5]) == E.UnknownApplicationError.code


def test_garbage_on_one_connection_leaves_others_alone(served, wire_conn):
    bad = wire_conn(served.port)
    good = wire_conn(served.port)
    bad.send_raw(struct.pack(">I", 10) + b"\xc1" * 10 + b"\xff\xff\xff\xff")  # then an absurd length prefix
    good.send(wire.predict(1, "sum", GOOD))
    assert good.recv(1)[0][3] == 6.0
    assert _code(bad.recv(2)[1]) == E.FrameTooLargeError.code


def test_max_pending_per_connection(frontend_factory, wire_conn, tmp_path):
    # model_zoo.gated holds the batch until the refusal is in (no sleep for a loaded machine to outlast)
    fe = frontend_factory(max_pending_per_connection=2)
    fe.deploy("sleepy", "gated", max_batch=1, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(fe.port)
    for i in range(3):
        c.send(wire.predict(i, "sleepy", np.array([i, 1, 0, 0], np.float32)))
    (refused,) = c.recv(1)
    (tmp_path / "gate-1").touch()
    assert refused[1] == 2 and _code(refused) == E.LimitExceededError.code
    assert "max_pending_per_connection is 2" in refused[4]
    out = {m[1]: m for m in c.recv(2)}
    assert out[0][0] == out[1][0] == wire.RESULT and (out[0][3], out[1][3]) == (0.0, 1.0)


def test_queue_full(frontend_factory, wire_conn, tmp_path):
    # The first query sent to the only replica is held there (model_zoo.gated) while the others arrive:
    # two wait in the queue, the rest find it full, whatever the machine's load. (One or none of the six
    # is in the replica when the queue fills, depending on whether the frontend read them in one go: so
    # three or four refusals, the first three coming before any answer.)
    fe = frontend_factory(max_queue_length=2)
    fe.deploy("sleepy", "gated", max_batch=1, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(fe.port)
    for i in range(6):
        # distinct inputs: equal ones would join one cache entry, not queue
        c.send(wire.predict(i, "sleepy", np.array([i, 1, 0, 0], np.float32)))
    first = c.recv(3)
    (tmp_path / "gate-1").touch()
    out = first + c.recv(3)
    assert {_code(m) for m in first} == {E.QueueFullError.code}
    refused = [m for m in out if m[0] == wire.ERROR]
    served = [m for m in out if m[0] == wire.RESULT]
    assert {_code(m) for m in refused} == {E.QueueFullError.code} and len(served) in (2, 3), out
    assert sorted(m[1] for m in out) == list(range(6)) and all(m[3] == float(m[1]) for m in served)


def test_max_connections(frontend_factory, wire_conn):
    fe = frontend_factory(max_connections=1)
    fe.deploy("sum", "row_sum")
    first = wire_conn(fe.port)
    first.send(wire.ping(1))
    assert first.recv(1)[0][0] == wire.PONG
    second = wire_conn(fe.port)
    msg = second.recv(1)[0]
    assert _code(msg) == E.LimitExceededError.code and "max_connections is 1" in msg[4]
    first.send(wire.predict(2, "sum", GOOD))
    assert first.recv(1)[0][3] == 6.0


def test_a_frame_that_would_decode_into_too_many_objects_is_refused_before_decoding(frontend_factory, wire_conn):
    # Nested empty arrays decode 65-fold (a Python list per byte): a frame is counted before it is decoded and
    # refused past max_decoded_objects with LIMIT_EXCEEDED; the connection goes on.
    fe = frontend_factory(max_decoded_objects=10_000)
    fe.deploy("text", "reverse_bytes", dtype="str", shape=(), model="text-model")
    c = wire_conn(fe.port)
    options = {"junk": [[[] for _ in range(100)] for _ in range(200)]}  # 20,202 objects in ~20 KB
    c.send_raw(framing.pack_frame(msgpack.packb([wire.PREDICT, 1, "text", "abc", options])))
    c.send(wire.predict(2, "text", "abc"))
    refused, answered = c.recv(2)
    assert refused[1] is None and _code(refused) == E.LimitExceededError.code and "max_decoded_objects" in refused[4]
    assert answered[0] == wire.RESULT and answered[1] == 2 and answered[3] == "cba"
