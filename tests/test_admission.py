"""Admission control, byte budgets and inputs checked before they are decoded, on real frontends and
real containers: what cannot be served within its SLO is refused at arrival, never queued to time out."""

from __future__ import annotations

import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clipper import errors as E
from clipper._native import _framing as native
from clipper._native import framing_py as twin
from clipper.config import FrontendConfig
from clipper.protocol import wire

X = np.array([0.2, 0, 0, 0], np.float32)  # sleep_by_input: sleeps x[0] seconds, answers x[0]


def _code(msg) -> int:
    return msg[2] if msg[0] == wire.ERROR else 0


def _warm(fe, c, app: str, x=X) -> None:
    """A batch answered by the model, so its queue has a measured latency.

    A container's first batch can outlast the SLO on a loaded machine: its query then gets the default
    output at the deadline while the batch is still out, and a burst sent next would find a replica
    with no latency history (admitted, all of it). So this waits for that batch to come back and sends
    another, until the model itself answers (a lone query at a free replica is always admitted)."""
    for _ in range(5):
        c.send(wire.predict(0, app, x))
        m = c.recv(1, timeout=30)[0]
        fe.wait_until(lambda s: s["models"][f"{app}-model:1"]["free_replicas"] == 1, what="the replica free")
        if m[0] == wire.RESULT and not m[4]:
            return
    raise AssertionError(f"the model of {app} never answered in time: {m}")


@pytest.mark.parametrize("on_overload,hold", [("error", 0.5), ("default", 0.0), ("default", 0.5)])
def test_what_cannot_be_served_in_time_is_refused_at_arrival(frontend_factory, wire_conn, on_overload, hold):
    # OVERLOADED goes at once; a default answer to a refusal goes default_refusal_hold of the SLO after its
    # query arrived (0: at once), within the SLO either way.
    frontend = frontend_factory(default_refusal_hold=hold)
    frontend.deploy("slow", "sleep_by_input", slo_ms=500, max_batch=1, batching="fixed", cache=False,
                    default_output=-1.0, on_overload=on_overload)
    c = wire_conn(frontend.port)
    _warm(frontend, c, "slow")  # batches take ~200 ms: about two fit in the 500 ms SLO
    sent = time.monotonic()
    for i in range(1, 11):
        c.send(wire.predict(i, "slow", X))
    out, after = [], []
    for _ in range(10):
        out += c.recv(1, timeout=30)
        after.append(time.monotonic() - sent)
    refused = [k for k, m in enumerate(out) if (
        _code(m) == E.OverloadedError.code if on_overload == "error"
        else m[0] == wire.RESULT and m[4] and "refused at arrival" in m[5]["explanation"])]
    served = [k for k, m in enumerate(out) if out[k][0] == wire.RESULT and not out[k][4]]
    assert len(refused) + len(served) == 10 and 1 <= len(served) <= 3, out
    first_served = served[0]
    if on_overload == "default" and hold:
        # held: none sooner than a quarter of a second (half the SLO) after it was sent, all within the SLO
        assert all(0.25 <= after[k] < 0.5 for k in refused), [after[k] for k in refused]
    else:
        # at once: before the answer of the first query admitted after the warm-up
        assert all(k < first_served for k in refused)
    assert all(out[k][3] == pytest.approx(0.2) for k in served)
    st_ = frontend.stats()
    assert st_["applications"]["slow"]["overloaded"] == len(refused)
    assert st_["models"]["slow-model:1"]["queries_sent"] == 1 + len(served)  # refused work was never queued
    why = out[refused[0]][4] if on_overload == "error" else out[refused[0]][5]["explanation"]
    assert "estimated from its queue" in why


def test_a_stalled_replica_drains_nothing_so_new_queries_are_refused_until_it_answers(frontend, wire_conn):
    frontend.deploy("slow", "sleep_by_input", slo_ms=500, max_batch=1, batching="fixed", cache=False,
                    on_deadline="error")
    c = wire_conn(frontend.port)
    _warm(frontend, c, "slow", np.array([0.01, 0, 0, 0], np.float32))
    c.send(wire.predict(1, "slow", np.array([3.0, 0, 0, 0], np.float32)))  # holds the replica 3 s
    queue = frontend.fe.processor.queues["slow-model:1"]
    deadline = time.monotonic() + 10
    while frontend.call(lambda: queue.estimate_ns(time.monotonic_ns())) != float("inf"):
        assert time.monotonic() < deadline, "the replica never looked stalled"
        time.sleep(0.01)
    c.send(wire.predict(2, "slow", X))
    refusal = c.recv(1)[0]
    assert refusal[1] == 2 and _code(refusal) == E.OverloadedError.code and "no replica" in refusal[4]
    late = c.recv(1, timeout=30)[0]  # the 3 s query: past its 500 ms SLO
    assert late[1] == 1 and _code(late) == E.DeadlineExceededError.code
    frontend.wait_until(lambda s: s["models"]["slow-model:1"]["free_replicas"] == 1, what="the replica back")
    c.send(wire.predict(3, "slow", np.array([0.01, 0, 0, 0], np.float32)))
    assert c.recv(1)[0][0] == wire.RESULT  # answering again: admitted again


def _slow_burst(fe, wire_conn):
    """A model taking ~100 ms per batch of one behind a 30 s SLO, warmed up, then 12 queries sent at once."""
    fe.deploy("slow", "sleep_by_input", slo_ms=30_000, max_batch=1, batching="fixed", cache=False,
              default_output=-1.0, on_overload="error")
    c = wire_conn(fe.port)
    x = np.array([0.1, 0, 0, 0], np.float32)
    _warm(fe, c, "slow", x)
    for i in range(1, 13):
        c.send(wire.predict(i, "slow", x))
    return c, x


@pytest.mark.parametrize("wait_batches", [2, 100])
def test_a_query_that_would_wait_behind_a_deep_queue_is_refused_even_within_its_slo(frontend_factory, wire_conn,
                                                                                      wait_batches):
    # Batches of one take ~100 ms and the SLO is 30 s: the SLO alone would admit all twelve. The queue
    # ahead of a query may hold admission_wait_batches batch latencies of work: with 2, the query
    # in flight and about two queued are admitted and the rest refused at once; with 100, all admitted.
    fe = frontend_factory(admission_wait_batches=wait_batches, admission_standing_ms=0)
    c, x = _slow_burst(fe, wire_conn)
    out = c.recv(12, timeout=60)
    refused = [m for m in out if _code(m) == E.OverloadedError.code]
    served = [m for m in out if m[0] == wire.RESULT and not m[4]]
    assert len(refused) + len(served) == 12, out
    if wait_batches == 2:
        # (up to 5: the estimate counts the busy replica's remaining time, so a burst the frontend reads in
        # several reads, the first batch already partly done, may admit one more: seen once in CI's run)
        assert 2 <= len(served) <= 5, out
        assert all("at capacity" in m[4] and "refused at arrival" in m[4] for m in refused), refused
        # refused at arrival: every refusal came before the second answer
        assert all(out.index(m) < out.index(served[1]) for m in refused)
    else:
        assert len(served) == 12 and not refused
    st_ = fe.stats()
    assert st_["applications"]["slow"]["overloaded"] == len(refused)
    assert st_["models"]["slow-model:1"]["queries_sent"] == 1 + len(served)


def test_a_burst_at_an_idle_model_is_judged_by_the_slo_alone_and_a_standing_queue_is_capped(frontend_factory,
                                                                                            wire_conn):
    # The cap on queued work applies to a standing queue (not empty for admission_standing_ms): 12
    # queries sent at once to an idle model are all admitted (the 30 s SLO allows them); a stream that
    # keeps the queue from emptying for longer than that is capped at ~2 batches of queued work.
    fe = frontend_factory(admission_standing_ms=300)
    c, x = _slow_burst(fe, wire_conn)
    first = c.recv(12, timeout=60)
    assert all(m[0] == wire.RESULT and not m[4] for m in first), first  # all served
    # now a stream: 12 more at once, then one more whenever an answer comes back; the queue stays
    # non-empty for over a second, so past 300 ms arrivals meet the cap
    for i in range(100, 112):
        c.send(wire.predict(i, "slow", x))
    out, sent = [], 112
    while len(out) < 30:
        m = c.recv(1, timeout=60)[0]
        out.append(m)
        if sent < 130:
            c.send(wire.predict(sent, "slow", x))
            sent += 1
    out += c.recv(sent - 100 - len(out), timeout=60)
    refused = [m for m in out if _code(m) == E.OverloadedError.code]
    assert refused and all("at capacity" in m[4] for m in refused), [m[:2] for m in out]
    assert fe.stats()["applications"]["slow"]["overloaded"] == len(refused)


def test_admission_wait_batches_is_checked_at_load():
    with pytest.raises(E.InvalidConfigError, match="admission_wait_batches"):
        FrontendConfig(admission_wait_batches=0)
    with pytest.raises(E.InvalidConfigError, match="admission_wait_batches"):
        FrontendConfig(admission_wait_batches=True)
    assert FrontendConfig(admission_wait_batches=3).admission_wait_batches == 3
    with pytest.raises(E.InvalidConfigError, match="admission_standing_ms"):
        FrontendConfig(admission_standing_ms=-1)
    for bad in (-0.1, 0.95, 1, True, "0.5", float("nan")):
        with pytest.raises(E.InvalidConfigError, match="default_refusal_hold"):
            FrontendConfig(default_refusal_hold=bad)
    assert FrontendConfig().default_refusal_hold == 0 and FrontendConfig(default_refusal_hold=0.9).default_refusal_hold == 0.9


def test_the_in_flight_byte_budget_refuses_what_would_pass_it(frontend_factory, wire_conn):
    fe = frontend_factory(max_inflight_input_bytes=3 * 16, admission_control=False)
    fe.deploy("slow", "sleep_by_input", slo_ms=10_000, max_batch=1, batching="fixed", cache=False,
              on_deadline="error")
    c = wire_conn(fe.port)
    for i in range(5):
        c.send(wire.predict(i, "slow", np.array([0.3, i, 0, 0], np.float32)))
    out = {m[1]: m for m in c.recv(5, timeout=30)}
    assert [_code(out[i]) for i in range(5)] == [0, 0, 0, E.OverloadedError.code, E.OverloadedError.code]
    assert "max_inflight_input_bytes" in out[3][4]
    assert fe.call(lambda: fe.fe.processor.inflight_bytes) == 0  # every ticket gave its bytes back


def test_admission_control_off_admits_everything(frontend_factory, wire_conn):
    fe = frontend_factory(admission_control=False)
    fe.deploy("slow", "sleep_by_input", slo_ms=300, max_batch=1, batching="fixed", cache=False, default_output=-1.0)
    c = wire_conn(fe.port)
    _warm(fe, c, "slow")
    for i in range(1, 6):
        c.send(wire.predict(i, "slow", X))
    out = c.recv(5, timeout=30)
    assert fe.stats()["applications"]["slow"]["overloaded"] == 0
    assert sum(1 for m in out if m[4]) >= 3  # the old way: queued, then answered by default at the deadline


# ---------------------------------------------------------------- nested lists, before decoding
def test_a_frame_larger_than_any_valid_request_is_skipped_unbuffered(frontend, wire_conn):
    frontend.deploy("img", "row_sum", dtype="float32", shape=(784,))
    rows = [[0.5] * 784 for _ in range(2000)]  # 1.6 M floats (14 MB) where 784 are expected
    data = wire.frame(wire.pack(wire.predict(1, "img", rows)))
    del rows
    c = wire_conn(frontend.port)
    tracemalloc.start()
    try:
        c.send_raw(data)
        msg = c.recv(1, timeout=30)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # No registered application takes a request that large: refused at its length prefix, its bytes
    # skipped as they came, never buffered (let alone decoded).
    assert msg[1] is None and _code(msg) == E.FrameTooLargeError.code, msg
    assert "the largest request any registered application can take" in msg[4]
    assert peak < 2 * 1024 * 1024, (peak, len(data))
    c.send(wire.predict(2, "img", [1.0] * 784))
    assert c.recv(1)[0][3] == pytest.approx(784.0)


def test_a_nested_list_within_the_frame_bound_is_refused_from_its_bytes(frontend, wire_conn):
    frontend.deploy("img", "row_sum", dtype="float32", shape=(784,))
    frontend.deploy("big", "row_sum", dtype="float32", shape=(1_000_000,), model="big-model", replicas=0)
    rows = [[0.5] * 784 for _ in range(500)]  # 392 k floats: within the bound "big" allows, wrong for "img"
    data = wire.frame(wire.pack(wire.predict(1, "img", rows)))
    del rows
    c = wire_conn(frontend.port)
    tracemalloc.start()
    try:
        c.send_raw(data)
        msg = c.recv(1, timeout=30)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _code(msg) == E.ShapeMismatchError.code and "input has shape [500, 784]" in msg[4]
    # The frontend held the frame's bytes (the reader's buffer, grown as they came); decoding would have
    # built 392 k Python floats and their lists besides, several times as much again.
    assert peak < 2.5 * len(data), (peak, len(data))


@pytest.mark.parametrize("bad, code, words", [
    ([[1.0] * 784, [1.0] * 784], E.ShapeMismatchError.code, "input has shape [2, 784]"),
    ([1.0] * 783 + ["x"], E.DTypeMismatchError.code, "holds str values"),
    ([1.0] * 783 + [[1.0]], E.InvalidInputError.code, "ragged"),
    ([1.0] * 783 + [None], E.DTypeMismatchError.code, "nil"),
])
def test_nested_list_refusals_name_what_is_wrong(frontend, wire_conn, bad, code, words):
    frontend.deploy("img", "row_sum", dtype="float32", shape=(784,))
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "img", bad))
    msg = c.recv(1)[0]
    assert _code(msg) == code and words in msg[4], msg


def test_errors_never_echo_a_huge_client_value(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    c = wire_conn(frontend.port)
    # (each frame within the largest request the frontend takes: ~64 KiB here)
    c.send([wire.PREDICT, b"x" * 60_000, "sum", X])  # a bin request id
    c.send(wire.predict(1, "a" * 60_000, X))  # an unknown application with a long name
    c.send(wire.hello(2, versions=list(range(100_000, 112_000))))
    out = c.recv(3, timeout=30)
    assert all(len(msgpack.packb(m)) < 2048 for m in out), [len(msgpack.packb(m)) for m in out]
    assert [_code(m) for m in out] == [E.MalformedFrameError.code, E.UnknownApplicationError.code,
                                       E.UnsupportedVersionError.code]


_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
_leaf = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True), st.booleans(), st.none(),
                  st.text(max_size=3), st.binary(max_size=3))


def _nested(depth: int):
    if depth == 0:
        return _leaf
    return st.lists(st.one_of(_nested(depth - 1), _leaf), max_size=5)


@settings(max_examples=400, deadline=None)
@given(shape=_shapes, free=st.booleans(), value=st.one_of(_nested(3), _leaf), app=st.text(max_size=8),
       req_id=st.integers(0, 2**64 - 1), int_app=st.booleans(), max_bytes=st.sampled_from([8, 40, 4096]))
def test_native_and_pure_prescans_agree_and_never_pass_a_misfit(shape, free, value, app, req_id, int_app,
                                                                 max_bytes):
    if free:
        shape = (-1,) + shape[1:]
    body = msgpack.packb([1, req_id, app, value, None])
    a, b = native.request_head(body), twin.request_head(body)
    assert a == b and a is not None and a[:3] == (1, req_id, app)
    if not a[4]:  # not a list: nothing to check in its bytes
        return
    ra = native.check_nested(body, a[3], shape, 4, max_bytes, int_app)
    rb = twin.check_nested(body, b[3], shape, 4, max_bytes, int_app)
    # the verdict on the bytes is the verdict on the decoded list (docs/protocol.md section 4's order)
    assert ra == rb == twin.judge_list(value, shape, 4, max_bytes, int_app)
    if ra is None:  # a pass means the decoded value really has that shape, with number leaves
        arr = np.array(value)
        assert arr.ndim == len(shape) and all(w in (-1, g) for g, w in zip(arr.shape, shape))
        assert arr.dtype.kind in "biuf" or (arr.dtype.kind == "O" and arr.size)  # (ints past int64 and uint64)


@settings(max_examples=200, deadline=None)
@given(req_id=st.integers(0, 2**64 - 1), code=st.integers(0, 2**16), name=st.text(max_size=20),
       message=st.text(max_size=300))
def test_error_frames_from_encoded_words_are_what_msgpack_makes(req_id, code, name, message):
    tail = msgpack.packb(code) + msgpack.packb(name) + msgpack.packb(message)
    expected = native.pack_frame(msgpack.packb([wire.ERROR, req_id, code, name, message]))
    assert native.error_frame(req_id, tail) == twin.error_frame(req_id, tail) == expected


_run_item = st.one_of(
    # PREDICT for the refused application (any id width, any input), the common case
    st.tuples(st.just("predict"), st.integers(0, 2**64 - 1), st.just("noop"),
              st.one_of(st.binary(max_size=40), st.lists(st.floats(allow_nan=False), max_size=4))),
    # PREDICT for another application, FEEDBACK for the same one, other messages: each ends the run
    st.tuples(st.just("predict"), st.integers(0, 2**32), st.sampled_from(["noop2", "noo", "", "nööp"]),
              st.just([1.0])),
    st.tuples(st.just("feedback"), st.integers(0, 2**32), st.just("noop"), st.just([1.0])),
    st.tuples(st.just("ping"), st.integers(0, 2**32), st.none(), st.none()),
    st.tuples(st.just("junk"), st.binary(max_size=12), st.none(), st.none()),
    st.tuples(st.just("oversized"), st.integers(1, 2**31), st.none(), st.none()),
)


def _run_items(specs) -> list:
    items = []
    for kind, a, app, x in specs:
        if kind == "predict":
            items.append(msgpack.packb([1, a, app, x]))
        elif kind == "feedback":
            items.append(msgpack.packb([2, a, app, x, 1.0]))
        elif kind == "ping":
            items.append(msgpack.packb([3, a]))
        elif kind == "junk":
            items.append(a)
        else:
            items.append(a)  # the reader's int for a frame over its limit
    return items


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(_run_item, max_size=12), start=st.integers(0, 3), max_body=st.integers(0, 80),
       as_views=st.booleans())
def test_refusing_a_run_of_frames_natively_matches_the_twin_and_frame_by_frame(specs, start, max_body, as_views):
    items = _run_items(specs)
    if as_views:  # the reader hands out memoryviews onto the read and bytearrays for split bodies
        items = [memoryview(x) if type(x) is bytes and len(x) % 2 else bytearray(x) if type(x) is bytes else x
                 for x in items]
    start = min(start, len(items))
    tail = msgpack.packb(309) + msgpack.packb("OVERLOADED") + msgpack.packb("refused")
    out_a, out_b = bytearray(), bytearray()
    end_a = native.refuse_run(items, start, b"noop", max_body, tail, out_a)
    end_b = twin.refuse_run(items, start, b"noop", max_body, tail, out_b)
    assert (end_a, out_a) == (end_b, out_b)
    # frame by frame: every refused item is a PREDICT for "noop" within max_body, and its frame is the
    # one error_frame makes; the item where the run stopped is not one
    expected = bytearray()
    for item in items[start:end_a]:
        head = native.request_head(item)
        assert head is not None and head[0] == 1 and head[2] == "noop" and len(item) <= max_body
        expected += native.error_frame(head[1], tail)
    assert out_a == expected
    if end_a < len(items):
        item = items[end_a]
        head = None if type(item) is int else native.request_head(item)
        assert head is None or head[0] != 1 or head[2] != "noop" or len(item) > max_body


@pytest.mark.parametrize("on_overload", ["error", "default"])
def test_a_pipelined_burst_past_capacity_is_refused_in_runs_with_every_request_answered_once(frontend, wire_conn,
                                                                                           on_overload):
    # One write carries 300 PREDICTs for a model busy for ~0.3 s, with a PING and a PREDICT for an
    # unknown application in the middle: after the first few admitted, the rest are refused (most in
    # native runs: OVERLOADED, or the default output flagged as such); every id is answered exactly
    # once, in a reply of the right kind, and every default answer has a query id of its own.
    app = f"slow-{on_overload}"
    frontend.deploy(app, "sleep_by_input", slo_ms=400, max_batch=1, batching="fixed", cache=False,
                    default_output=-1.0, on_overload=on_overload)
    runs_before = frontend.call(lambda: frontend.fe.processor.refused_in_runs)
    c = wire_conn(frontend.port)
    x = np.array([0.15, 0, 0, 0], np.float32)
    _warm(frontend, c, app, x)
    frames = []
    for i in range(1, 301):
        frames.append(wire.predict(i, app, x))
        if i == 150:
            frames.append([wire.PING, 1000])
            frames.append(wire.predict(1001, "no-such-app", x))
    c.send_raw(b"".join(native.pack_frame(wire.pack(m)) for m in frames))
    out = c.recv(302, timeout=60)
    by_id = {}
    for m in out:
        assert m[1] not in by_id, f"request {m[1]} answered twice"
        by_id[m[1]] = m
    assert set(by_id) == set(range(1, 301)) | {1000, 1001}
    assert by_id[1000][0] == wire.PONG
    assert _code(by_id[1001]) == E.UnknownApplicationError.code
    if on_overload == "error":
        refused = [i for i in range(1, 301) if _code(by_id[i]) == E.OverloadedError.code]
        assert all("refused at arrival" in by_id[i][4] for i in refused)
    else:
        refused = [i for i in range(1, 301) if by_id[i][0] == wire.RESULT and by_id[i][4]]
        assert all(by_id[i][3] == -1.0 and "refused at arrival" in by_id[i][5]["explanation"] for i in refused)
        qids = [by_id[i][2] for i in range(1, 301)]
        assert len(set(qids)) == 300  # a query id each, in runs too
    served = [i for i in range(1, 301) if by_id[i][0] == wire.RESULT and not by_id[i][4]]
    assert len(refused) + len(served) == 300 and len(refused) >= 290, (len(refused), len(served))
    st_ = frontend.stats()["applications"][app]
    assert st_["overloaded"] == len(refused) and st_["requests"] == 301  # the warm-up query, and these
    if on_overload == "default":
        assert st_["defaults"] == len(refused)
    # most refusals came in native runs (a frame refused at its head takes the frames after it along)
    assert frontend.call(lambda: frontend.fe.processor.refused_in_runs) - runs_before >= len(refused) // 2


def test_a_refusal_run_never_outlives_its_application():
    # shed_run refuses frames for the application admission refused last, while the refusal holds;
    # once the application is removed (or replaced by a new route), its frames go the whole way.
    import asyncio

    from clipper.config import Limits
    from clipper.management.registry import Application
    from clipper.query.batching import ModelQueue
    from clipper.query.processor import REFUSE_SLO, AppRoute, QueryProcessor

    loop = asyncio.new_event_loop()
    try:
        proc = QueryProcessor(loop, Limits().max_input_bytes, 0)
        route = AppRoute(Application("a", "float32", [4], slo_ms=20, cache=False, on_overload="error"), proc)
        proc.routes["a"] = route
        queue = ModelQueue("m:1", loop, lambda r, b: None, deployment_id=1, max_queue_length=10,
                           max_batch_retries=1, max_batch=8, budget_ns=10_000_000)
        route.set_links([("m", queue)])
        queue.refusing_until_ns = time.monotonic_ns() + 60_000_000_000
        queue.refusing_kind = REFUSE_SLO
        queue.refusing_budget_ns = route.answer_ns  # (an SLO refusal of this application)
        items = [msgpack.packb([1, i, "a", [0.0] * 4]) for i in range(3)]
        out = bytearray()
        assert proc.shed_run(route, items, 0, out) == 3 and proc.refused_in_runs == 3
        assert route.overloaded == 3 and route.errors == 3 and route.requests == 3
        del proc.routes["a"]
        out = bytearray()
        assert proc.shed_run(route, items, 0, out) == 0 and not out
        proc.routes["a"] = AppRoute(Application("a", "float32", [4], slo_ms=20, cache=False), proc)
        assert proc.shed_run(route, items, 0, out) == 0 and not out
    finally:
        loop.close()


def _shared_queue(short_slo_ms: float = 20):
    """A processor with applications a (SLO 10 s) and b (SLO ``short_slo_ms``) on one model queue whose
    only replica takes 100 ms per batch of one and is busy: ~100-400 ms of estimated work."""
    import asyncio

    from clipper.config import Limits
    from clipper.management.registry import Application
    from clipper.query.batching import ModelQueue
    from clipper.query.processor import AppRoute, QueryProcessor

    class Replica:
        def __init__(self) -> None:
            self.replica_id, self.pid, self.dead, self.batch, self.batch2, self.sizer = 1, 1, False, None, None, None

    class Sink:
        def send_result(self, *a):
            pass

    loop = asyncio.new_event_loop()
    proc = QueryProcessor(loop, Limits().max_input_bytes, 0)
    q = ModelQueue("m:1", loop, lambda r, b: None, deployment_id=1, max_queue_length=1000, max_batch_retries=1,
                   max_batch=1, batching="fixed", budget_ns=50_000_000)
    r = Replica()
    q.add_replica(r)
    r.lat_ewma_ns = 100e6
    q.free.clear()
    r.batch = type("B", (), {"sent_ns": time.monotonic_ns()})()
    q.replicas_changed()
    a = AppRoute(Application("a", "float32", [4], slo_ms=10_000, cache=False, on_overload="error"), proc)
    b = AppRoute(Application("b", "float32", [4], slo_ms=short_slo_ms, cache=False, on_overload="error"), proc)
    for rt in (a, b):
        proc.routes[rt.name] = rt
        rt.set_links([("m", q)])
    return loop, proc, q, a, b, Sink()


def test_an_admission_on_the_fast_path_admits_that_request_only():
    # Two applications share a model queue: a (10 s SLO) fits, b (20 ms) does not. The fast path
    # admitting a's frame must not let b's next query (REST, or any other path) skip its own check.
    loop, proc, q, a, b, sink = _shared_queue()
    x = np.zeros(4, np.float32)
    try:
        proc.predict(sink, 1, "a", x)  # something queued, so nothing is admitted for free
        with pytest.raises(E.OverloadedError):
            proc.predict(sink, 2, "b", x)
        assert proc.shed(a, 3, 40, sink) is None  # a's frame admitted at its head ...
        with pytest.raises(E.OverloadedError):
            proc.predict(sink, 4, "b", x)  # ... which admits nothing else
        assert proc.shed(a, 5, 40, sink) is None
        proc.predict(sink, 5, "a", x)  # the frame it admitted goes through
        assert a.overloaded == 0 and b.overloaded == 2
    finally:
        loop.close()


def test_one_applications_refusal_does_not_refuse_another_with_a_longer_slo():
    loop, proc, q, a, b, sink = _shared_queue()
    x = np.zeros(4, np.float32)
    try:
        proc.predict(sink, 1, "a", x)
        assert proc.shed(b, 2, 40, sink) is not None  # b refused: its 20 ms SLO cannot be met
        assert proc.shed(a, 3, 40, sink) is None  # a is not: the hold was b's SLO
        items = [msgpack.packb([1, i, "a", [0.0] * 4]) for i in range(3)]
        assert proc.shed_run(a, items, 0, bytearray()) == 0  # nor a run of a's frames
        # b's SLO refusal with the queue under the cap does not make the queue overloaded for a:
        # a's queries keep being judged by a's SLO alone (here ~0.3 s of work, far under 10 s)
        for i in range(10, 14):
            assert proc.shed(a, i, 40, sink) is None
            proc.predict(sink, i, "a", x)
        assert a.overloaded == 0
    finally:
        loop.close()


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(_run_item, max_size=12), start=st.integers(0, 3), max_body=st.integers(0, 80),
       first_qid=st.integers(0, 2**64 - 40), with_extra=st.booleans(), in_flight=st.sets(st.integers(0, 40)))
def test_answering_a_run_of_frames_with_the_default_natively_matches_the_twin_and_frame_by_frame(
        specs, start, max_body, first_qid, with_extra, in_flight):
    # default_run: the frames refuse_run takes, each answered with the application's default output (a
    # RESULT flagged default, with the refusal's extra) and a query id counting up, as shed answers one.
    items = _run_items(specs)
    start = min(start, len(items))
    output = msgpack.packb(-1.0)
    extra = msgpack.packb({"explanation": "refused", "confidence": 0.0, "models": []}) if with_extra else None
    ids_a, ids_b = native.IdSet(), twin.IdSet()
    for i in in_flight:
        ids_a.add(i)
        ids_b.add(i)
    out_a, out_b = bytearray(), bytearray()
    end_a = native.default_run(items, start, b"noop", max_body, first_qid, output, extra, out_a, ids_a)
    end_b = twin.default_run(items, start, b"noop", max_body, first_qid, output, extra, out_b, ids_b)
    assert (end_a, out_a) == (end_b, out_b)
    # the same items refuse_run takes
    assert native.refuse_run(items, start, b"noop", max_body, b"\xc0", bytearray(), ids_a) == end_a
    expected = bytearray()
    for k, item in enumerate(items[start:end_a]):
        head = native.request_head(item)
        assert head is not None and head[0] == 1 and head[2] == "noop" and len(item) <= max_body
        assert head[1] not in in_flight
        expected += native.result_frame(head[1], first_qid + k, output, True, extra)
        assert msgpack.unpackb(bytes(expected[-len(native.result_frame(head[1], first_qid + k, output, True, extra))
                                              + 4:])) == [65, head[1], first_qid + k, -1.0, True,
                                                          *([msgpack.unpackb(extra)] if extra else [])]
    assert out_a == expected


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(_run_item, max_size=12), start=st.integers(0, 3), max_out=st.integers(-1, 300),
       prefill=st.integers(0, 60), defaults=st.booleans())
def test_a_run_stops_once_its_answers_reach_max_out_bytes(specs, start, max_out, prefill, defaults):
    # A run of answers stops before its next frame once ``out`` holds max_out bytes (the port then writes
    # them and heeds a client that stopped reading); negative: no bound. Native and twin agree, and a
    # bounded run is the unbounded run's prefix.
    items = _run_items(specs)
    start = min(start, len(items))
    tail = msgpack.packb(309) + msgpack.packb("OVERLOADED") + msgpack.packb("refused")
    out = {}
    for impl in (native, twin):
        for bound in (max_out, -1):
            buf = bytearray(b"x" * prefill)
            if defaults:
                end = impl.default_run(items, start, b"noop", 80, 7, msgpack.packb(-1.0), None, buf, None, bound)
            else:
                end = impl.refuse_run(items, start, b"noop", 80, tail, buf, None, bound)
            out[impl, bound] = (end, bytes(buf))
    assert out[native, max_out] == out[twin, max_out] and out[native, -1] == out[twin, -1]
    end, got = out[native, max_out]
    full_end, full = out[native, -1]
    assert end <= full_end and full.startswith(got)
    if max_out >= 0:
        if end > start:  # it took a frame only while under the bound: the last one began below it
            one_less = bytearray(b"x" * prefill)
            if defaults:
                native.default_run(items[:end - 1], start, b"noop", 80, 7, msgpack.packb(-1.0), None, one_less)
            else:
                native.refuse_run(items[:end - 1], start, b"noop", 80, tail, one_less)
            assert len(one_less) < max_out
        assert end == full_end or len(got) >= max_out  # it stopped early only at the bound
    else:
        assert (end, got) == (full_end, full)
