"""Protocol fuzzing against a live frontend (Hypothesis, bounded in time).

Valid messages of every request type with fields replaced by arbitrary msgpack
values (wrong types, huge and negative integers, nested containers, numpy
arrays of any allowed dtype, unknown extension types), fields dropped or
added, arbitrary type codes; frames of random bytes; streams split at random
points; truncated frames and oversized length prefixes. After each example:

- every reply is a well-formed RESULT, ERROR, PONG, HELLO_OK or FEEDBACK_OK, an
  ERROR carries a known code with its name, and a reply's id is one we sent
  (or nil, for an ERROR about a frame the server could not attribute);
- every frame got exactly one reply (the protocol's rule), counted up to a PING
  sent last;
- the connection still answers that PING, or, where the example broke the stream
  on purpose (a truncated frame, garbage that is not a frame), a new
  connection does;
- the frontend's event loop reported no error (checked by the fixture).

The long run of the same idea is ``bench/fuzz_protocol.py`` (whose reply checks this file uses).
"""

from __future__ import annotations

import socket
import struct
from datetime import timedelta
from pathlib import Path

import msgpack
import pytest
from conftest import WireConn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.fuzz_protocol import check_reply, request_ids, split_frames
from clipper import errors as E
from clipper.protocol import wire

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 64 * 1024  # the fuzzed frontend's max_frame_bytes: oversized frames stay cheap to send
APP = "fz"
REPLY_TIMEOUT_S = 10.0


# A budget for the whole file: each example is a few socket round trips (and a model call).
FUZZ = settings(max_examples=200, deadline=timedelta(seconds=15), derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# ------------------------------------------------------------------ strategies
@st.composite
def ndarrays(draw):
    dtype = wire.ALLOWED_DTYPES[draw(st.sampled_from(sorted(wire.ALLOWED_DTYPES)))]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**32, 2**63 - 1, 2**64 - 1, -(2**63)]))
plain_leaves = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=12), st.binary(max_size=24),
                        ndarrays())
# Values the protocol forbids (other extension types, msgpack timestamps, ndarray payloads that do not
# parse, maps with non-str keys): the whole frame is MALFORMED_FRAME.
exotic_leaves = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=24)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),  # ext type -1
    st.builds(msgpack.ExtType, st.just(wire.EXT_NDARRAY), st.binary(max_size=40)),
)
plain_values = st.recursive(
    plain_leaves,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=16,
)
exotic_values = st.recursive(
    plain_leaves | exotic_leaves,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3)
    | st.dictionaries(ints, c, min_size=1, max_size=2),
    max_leaves=8,
)
values = st.one_of(plain_values, plain_values, plain_values, exotic_values)
good_inputs = st.one_of(
    hnp.arrays("<f4", (4,), elements=st.floats(-1e6, 1e6, width=32)),
    st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4),
    st.lists(st.integers(-1000, 1000), min_size=4, max_size=4),
)
def _nested(depth: int) -> list:
    x: list = [1.0]
    for _ in range(depth - 1):
        x = [x]
    return x


# Inputs close to what the application takes: other dtypes and shapes, ragged or mixed lists, deep nesting.
near_inputs = st.one_of(
    st.builds(lambda a: a, ndarrays()),
    hnp.arrays(st.sampled_from(["<f4", "<f8", "<i8", "|u1"]),
               st.sampled_from([(3,), (5,), (4, 1), (1, 4), (), (0,), (2, 2)])),
    st.lists(st.one_of(st.floats(), ints, st.booleans(), st.none(), st.text(max_size=3)), max_size=6),
    st.lists(st.lists(st.floats(-10, 10), max_size=5), max_size=5),
    st.integers(2, 60).map(_nested),
    st.text(max_size=8), st.binary(max_size=16),
)
ids = st.integers(0, 2**32)


@st.composite
def valid_messages(draw):
    kind = draw(st.sampled_from(["hello", "predict", "feedback", "ping"]))
    rid = draw(ids)
    if kind == "hello":
        return [wire.HELLO, rid, {"versions": draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)),
                                  "client": "fuzz"}]
    if kind == "ping":
        return [wire.PING, rid]
    app = draw(st.sampled_from([APP, APP, "nope", ""]))
    x = draw(st.one_of(good_inputs, near_inputs))
    opts = draw(st.none() | st.fixed_dictionaries({"user": st.text(max_size=8)}))
    if kind == "predict":
        return wire.predict(rid, app, x, opts)
    return wire.feedback(rid, app, x, draw(st.integers(-5, 5) | st.floats(-10, 10)), opts)


@st.composite
def mutated_messages(draw):
    msg = list(draw(valid_messages()))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "replace", "drop", "append", "type"]))
        if op == "replace" and msg:
            msg[draw(st.integers(0, len(msg) - 1))] = draw(values)
        elif op == "drop" and msg:
            del msg[draw(st.integers(0, len(msg) - 1)):]
        elif op == "append":
            msg.append(draw(values))
        elif op == "type" and msg:
            msg[0] = draw(st.integers(-1, 300) | ints)
    if draw(st.integers(0, 9)) == 0:  # not an array at all, or one nested in another
        msg = draw(st.sampled_from([[msg], {"m": msg}, msg[0] if msg else None, msg[1:] if msg else 0]))
    return msg


def frame_of(msg) -> bytes:
    return struct.pack(">I", len(body := wire.pack(msg))) + body


frames = st.one_of(
    mutated_messages().map(frame_of),
    mutated_messages().map(frame_of),
    mutated_messages().map(frame_of),
    valid_messages().map(frame_of),
    valid_messages().map(frame_of),
    st.binary(max_size=64).map(lambda b: struct.pack(">I", len(b)) + b),  # garbage bodies, framed
)


# ------------------------------------------------------------------ checks
def ids_in(data: bytes) -> set:
    """The request ids a stream of frames carries (what a reply's id may be)."""
    return request_ids(split_frames(data, MAX_FRAME)[0])


def ping_id(conn: WireConn, rid: int) -> list:
    """Send PING ``rid``; return every reply up to and including its PONG."""
    conn.send(wire.ping(rid))
    out = []
    while True:
        (msg,) = conn.recv(1, timeout=REPLY_TIMEOUT_S)
        out.append(msg)
        if msg[0] == wire.PONG and msg[1] == rid:
            return out


def fresh_ping(port: int) -> None:
    c = WireConn(port)
    try:
        c.sock.settimeout(REPLY_TIMEOUT_S)
        assert ping_id(c, 424242)[-1] == [wire.PONG, 424242]
    finally:
        c.close()


# ------------------------------------------------------------------ the frontend
@pytest.fixture
def fuzzed(frontend_factory):
    fe = frontend_factory(max_frame_bytes=MAX_FRAME, feedback_timeout_ms=200)
    fe.deploy(APP, "row_sum", shape=(4,), slo_ms=300.0, default_output=-1.0, max_batch=8)
    return fe


class Session:
    """One connection reused across examples; replaced when the server (or a test) closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: WireConn | None = None
        self.next_ping = 1 << 40  # ping ids no fuzzed frame uses (they stay below 2**32 + 1)

    def get(self) -> WireConn:
        if self.conn is None:
            self.conn = WireConn(self.port)
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def exchange(self, stream: bytes, n_frames: int, chunks: list[int]) -> None:
        """Send ``stream`` (``n_frames`` whole frames) split at ``chunks``, then a PING; check every reply."""
        conn = self.get()
        pos = 0
        for size in chunks:
            if pos >= len(stream):
                break
            conn.send_raw(stream[pos:pos + size])
            pos += size
        if pos < len(stream):
            conn.send_raw(stream[pos:])
        self.next_ping += 1
        pid = self.next_ping
        sent = ids_in(stream) | {pid}
        try:
            replies = ping_id(conn, pid)
        except (ConnectionError, OSError):
            # The server may close a connection for a connection-level reason; a new one must work.
            self.drop()
            fresh_ping(self.port)
            return
        # Replies to requests that go to the model may come after the PONG: collect them too.
        expected = n_frames + 1
        if len(replies) < expected:
            replies += conn.recv(expected - len(replies), timeout=REPLY_TIMEOUT_S)
        for msg in replies:
            check_reply(msg, sent)
        assert len(replies) == expected, f"{n_frames} frames and a PING got {len(replies)} replies: {replies!r}"


# ------------------------------------------------------------------ the tests
def test_fuzzed_frames_get_one_typed_reply_each(fuzzed):
    session = Session(fuzzed.port)

    @FUZZ
    @given(batch=st.lists(frames, min_size=1, max_size=4),
           chunks=st.lists(st.integers(1, 64), max_size=6))
    def run(batch, chunks):
        session.exchange(b"".join(batch), len(batch), chunks)

    try:
        run()
    finally:
        session.drop()


def test_oversized_and_truncated_frames(fuzzed):
    port = fuzzed.port
    session = Session(port)

    @settings(FUZZ, max_examples=40)
    @given(kind=st.sampled_from(["oversized", "oversized_sent", "truncated_close", "garbage_close", "zero"]),
           excess=st.integers(1, 3 * MAX_FRAME), cut=st.integers(0, 64), junk=st.binary(min_size=1, max_size=200),
           msg=mutated_messages())
    def run(kind, excess, cut, junk, msg):
        body = wire.pack(msg)
        if kind == "oversized_sent":
            # A prefix over max_frame_bytes, its body sent in full: one FRAME_TOO_LARGE, stream in step.
            n = MAX_FRAME + excess
            stream = struct.pack(">I", n) + bytes(n)
            conn = session.get()
            conn.send_raw(stream)
            session.next_ping += 1
            replies = ping_id(conn, session.next_ping)
            assert len(replies) == 2, replies
            check_reply(replies[0], {session.next_ping})
            assert replies[0][:3] == [wire.ERROR, None, E.FrameTooLargeError.code]
            return
        if kind == "zero":
            session.exchange(b"\0\0\0\0" + struct.pack(">I", len(body)) + body, 2, [])
            return
        # The stream is broken on purpose: a new connection must be served; so must another one.
        s = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
        try:
            if kind == "oversized":
                s.sendall(struct.pack(">I", MAX_FRAME + excess) + body[:cut])
            elif kind == "truncated_close":
                s.sendall(struct.pack(">I", len(body) + 1 + cut) + body)
            else:
                s.sendall(junk)
        finally:
            s.close()
        fresh_ping(port)
        session.exchange(frame_of(msg), 1, [])

    try:
        run()
    finally:
        session.drop()


# ------------------------------------------------------------------ what the long run found
FINDINGS = Path(__file__).resolve().parent.parent / "bench" / "results" / "fuzz-findings"


# Found by bench.fuzz_protocol (hello-versions-ndarray): QueryConnection._on_hello answered INTERNAL_ERROR to a
# HELLO whose versions hold an ndarray (compared elementwise). Fixed; kept as a regression test.
@pytest.mark.parametrize("name", ["hello-versions-ndarray.min.bin", "hello-versions-ndarray.atheris-crash.bin"])
def test_known_finding_hello_versions_ndarray(frontend, name):
    data = (FINDINGS / name).read_bytes()
    conn = WireConn(frontend.port)
    try:
        conn.send_raw(data)
        n = len(split_frames(data)[0])
        replies = conn.recv(n, timeout=REPLY_TIMEOUT_S)
        for msg in replies:
            check_reply(msg, ids_in(data))
        assert replies[-1][2] in (E.MalformedFrameError.code, E.UnsupportedVersionError.code), replies
        assert ping_id(conn, 77)[-1] == [wire.PONG, 77]
    finally:
        conn.close()
