"""Policy states read off the event loop: StateTable.fetch over the real stores, and a frontend whose
state store stops answering (its writer thread held) keeps serving."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clipper import errors as E
from clipper.client import Client
from clipper.store import SQLiteStore, StateTable
from clipper.store.states import encode_state

INIT = {"logw": {}, "updates": 0}


def _init():
    return {"logw": {}, "updates": 0}


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "s.sqlite", background=True)  # the frontend's: reads and writes on its thread
    yield s
    s.close()


def _hold_writer(store: SQLiteStore) -> threading.Event:
    """Keep the store's writer thread busy until the returned event is set (a stuck disk, say)."""
    release, busy = _hold_writer_nowait(store)
    assert busy.wait(10)
    return release


def _run_until(loop, pred, timeout=10.0):
    async def wait():
        while not pred():
            await asyncio.sleep(0.005)

    loop.run_until_complete(asyncio.wait_for(wait(), timeout))


def test_fetch_reads_on_the_stores_thread_and_one_read_serves_every_waiter(loop, store):
    store.save_many([("policy/app", "alice", encode_state("exp4", {"logw": {"a": -1.0}, "updates": 3}))])
    t = StateTable(store, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop)
    assert t.peek("alice") is None
    got = []
    t.fetch("alice", lambda st, known: got.append((st, known, threading.current_thread())))
    t.fetch("alice", lambda st, known: got.append((st, known, threading.current_thread())))
    assert got == []  # not answered inside fetch: the read is on the store's thread
    _run_until(loop, lambda: len(got) == 2)
    (a, ka, th_a), (b, kb, th_b) = got
    assert a is b and a == {"logw": {"a": -1.0}, "updates": 3} and ka and kb
    assert th_a is threading.main_thread() and th_b is threading.main_thread()  # callbacks on the loop's thread
    assert t.loads == 1 and t.peek("alice") is a  # one read, and memory holds it now
    # a user the store does not know: a fresh state, kept
    t.fetch("bob", lambda st, known: got.append((st, known)))
    _run_until(loop, lambda: len(got) == 3)
    assert got[2] == (INIT, True) and t.fresh == 1 and t.peek("bob") == INIT


def test_a_store_that_does_not_answer_in_time_gives_a_fresh_state_that_is_not_kept(loop, store):
    store.save_many([("policy/app", "carol", encode_state("exp4", {"logw": {"a": -2.0}, "updates": 5}))])
    store.flush()
    t = StateTable(store, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop, load_timeout_s=0.2)
    release = _hold_writer(store)
    got = []
    try:
        t.fetch("carol", lambda st, known: got.append((st, known)))
        _run_until(loop, lambda: got)
        assert got == [(INIT, False)] and t.load_failures == 1
        assert t.peek("carol") is None  # not kept: the next query tries the store again
    finally:
        release.set()
    store.flush()
    loop.run_until_complete(asyncio.sleep(0.05))  # the late answer of the read that timed out arrives...
    assert len(got) == 1 and t.peek("carol") is None  # ... and is not taken for anyone's
    t.fetch("carol", lambda st, known: got.append((st, known)))
    _run_until(loop, lambda: len(got) == 2)
    assert got[1] == ({"logw": {"a": -2.0}, "updates": 5}, True)


def test_a_state_put_while_its_read_was_out_is_the_one_kept(loop, store):
    store.save_many([("policy/app", "dave", encode_state("exp4", {"logw": {}, "updates": 1}))])
    t = StateTable(store, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop)
    release = _hold_writer(store)
    got = []
    t.fetch("dave", lambda st, known: got.append((st, known)))
    newer = {"logw": {"a": -0.5}, "updates": 2}
    t.put("dave", newer)
    release.set()
    _run_until(loop, lambda: got)
    assert got == [(newer, True)] and t.peek("dave") is newer


def test_a_read_that_fails_is_reported_not_kept(loop, tmp_path):
    s = SQLiteStore(tmp_path / "closed.sqlite", background=True)
    s.close()  # its writer is gone: a read fails at once
    t = StateTable(s, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop)
    got = []
    t.fetch("erin", lambda st, known: got.append((st, known)))
    _run_until(loop, lambda: got)
    assert got == [(INIT, False)] and t.load_failures == 1 and t.peek("erin") is None


def test_a_frontend_whose_store_is_stuck_answers_queries_and_refuses_to_learn_blind(frontend_factory, tmp_path):
    # the store's read may take a minute: a request waits at most half its own deadline for it
    fe = frontend_factory(state_path=str(tmp_path / "state.sqlite"), state_load_timeout_ms=60_000)
    fe.deploy_ensemble("stuck", [("right", "first_as_label", None), ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})],
                       output_kind="label", slo_ms=400)
    x = np.array([3, 0, 0, 0], np.float32)
    release = fe.call(lambda: _hold_writer_nowait(fe.fe.store))
    try:
        assert release[1].wait(10)
        with Client("127.0.0.1", fe.port, timeout=10) as c:
            # a user memory does not hold: the read times out, the query is answered with a fresh state
            p = c.predict("stuck", x, user="frank")
            assert not p.is_default and p.output in (0, 3)
            with pytest.raises(E.StateUnavailableError, match="nothing was learned"):
                c.feedback("stuck", x, 3, user="frank")
        st = fe.stats()
        assert st["states"]["state_wait_timeouts"] == 2 and st["states"]["waiting_for_state"] == 0
    finally:
        release[0].set()
    with Client("127.0.0.1", fe.port) as c:
        c.feedback("stuck", x, 3, user="frank")  # the store answers again: learned
    assert fe.state("stuck", "frank")["updates"] == 1


_READ_FROM_ANOTHER_PROCESS = r"""
import sys, time
import msgpack
from clipper.store.sqlite import SQLiteStore
path, ns, key, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + timeout
while True:
    store = SQLiteStore(path)  # a fresh store each time: nothing cached between reads
    raw = store.load(ns, key)
    store.close()
    if raw is not None or time.monotonic() > deadline:
        break
    time.sleep(0.05)
sys.stdout.write("null" if raw is None else __import__("json").dumps(msgpack.unpackb(raw, raw=False)))
"""


def _read_state_from_another_process(path, app: str, user: str, timeout: float = 20.0):
    """The policy state of ``app`` for ``user`` as a second process reads it from the SQLite file, waiting up
    to ``timeout`` s for it to appear (None if it never does)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _READ_FROM_ANOTHER_PROCESS, str(path), f"policy/{app}", user,
                          str(timeout)], capture_output=True, text=True, timeout=timeout + 60, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _learning_frontend(frontend_factory, tmp_path, app: str):
    path = tmp_path / "state.sqlite"
    fe = frontend_factory(state_path=str(path), state_flush_ms=50)
    fe.deploy_ensemble(app, [("right", "first_as_label", None), ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})],
                       output_kind="label")
    return fe, path


def test_learned_states_reach_the_file_behind_the_caller_where_another_process_reads_them(frontend_factory,
                                                                                         tmp_path):
    """Feedback changes a user's state in memory; the write-behind flush (``state_flush_ms``) puts it in the
    SQLite file with no flush or stop asked for, and a second process reading the file sees it.

    Mutations caught: ``_states_dirty`` arming no timer (the state reaches the file only at the stop: the
    other process never sees it); ``state_flush_ms`` not passed from the config to the query processor."""
    fe, path = _learning_frontend(frontend_factory, tmp_path, "wb")
    assert fe.call(lambda: fe.fe.processor.state_flush_s) == 0.05
    x = np.array([3, 0, 0, 0], np.float32)
    with Client("127.0.0.1", fe.port) as c:
        c.feedback("wb", x, 3, user="ann")
        c.feedback("wb", x, 3, user="ann")
    in_memory = fe.state("wb", "ann")
    assert in_memory["updates"] == 2
    on_disk = _read_state_from_another_process(path, "wb", "ann")
    assert on_disk is not None and on_disk["state"] == in_memory  # read while the frontend still runs
    assert fe.stats()["states"]["flush_errors"] == 0


def test_a_state_save_that_fails_once_is_tried_again_and_loses_nothing(frontend_factory, tmp_path):
    """The store refuses the first save of policy states (a full disk, say); the flush keeps the changed
    states and tries again ``state_flush_ms`` later: the file ends up holding them.

    Mutations caught: the failed flush not giving the taken states back (``give_back`` dropped: the retry
    has nothing to write, the file never holds the state); no retry armed after a failure
    (``self._states_dirty()`` dropped in the except branch: nothing is written until the stop)."""
    fe, path = _learning_frontend(frontend_factory, tmp_path, "retry")
    store = fe.fe.processor.store
    calls: list = []
    real_save_many = store.save_many

    def fails_once(items):
        items = list(items)
        calls.append(len(items))
        if len(calls) == 1:
            raise OSError("database or disk is full (injected by the test)")
        return real_save_many(items)

    fe.call(lambda: setattr(store, "save_many", fails_once))
    x = np.array([3, 0, 0, 0], np.float32)
    with Client("127.0.0.1", fe.port) as c:
        c.feedback("retry", x, 3, user="bob")
    fe.wait_until(lambda s: s["states"]["flush_errors"] >= 1, what="the first save failed")
    # no other change comes to make the state dirty again: only the retry can write it
    on_disk = _read_state_from_another_process(path, "retry", "bob")
    assert on_disk is not None and on_disk["state"] == fe.state("retry", "bob"), on_disk
    assert on_disk["state"]["updates"] == 1
    st = fe.stats()["states"]
    assert st["flush_errors"] == 1 and st["flushes"] >= 1 and len(calls) >= 2


def _hold_writer_nowait(store):
    """_hold_writer from the frontend's loop (which must not wait): (release, busy) events."""
    release, busy = threading.Event(), threading.Event()

    def stuck(_n):
        busy.set()
        release.wait(30)

    store.trim_later("nothing", 1, stuck)
    return release, busy


# ------------------------------------------------------------------ the Redis store
import os  # noqa: E402
import signal  # noqa: E402
import uuid  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from clipper.store.redis import RedisStore  # noqa: E402
from conftest import check_store_against_model  # noqa: E402

ops = st.lists(st.one_of(
    st.tuples(st.just("save"), st.lists(st.tuples(st.sampled_from(["a", "b/x"]), st.sampled_from("uvwxyz"),
                                                  st.binary(max_size=8)), max_size=4)),
    st.tuples(st.just("trim"), st.sampled_from(["a", "b/x"]), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.sampled_from(["a", "b/x"]), st.sampled_from("uvwxyz")),
    st.tuples(st.just("drop"), st.sampled_from(["a", "b/x"])),
), max_size=25)


@settings(max_examples=60, deadline=None)
@given(seq=ops)
def test_redis_store_matches_a_reference_model(redis_server, seq):
    # writes are applied behind the caller's back, in order: every read must still see the last write
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}")
    try:
        check_store_against_model(store, seq, ("a", "b/x"), reports_deletes=False)
    finally:
        store.close()


def test_two_frontends_stores_share_values_and_one_recency_order(redis_server):
    prefix = f"t{uuid.uuid4().hex}"
    one, two = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url, prefix=prefix)
    try:
        one.save_many([("policy/app", "alice", b"1")])
        one.flush()
        two.save_many([("policy/app", "bob", b"2")])
        two.flush()
        one.save_many([("policy/app", "carol", b"3")])
        one.flush()
        assert two.load("policy/app", "alice") == b"1" and one.load("policy/app", "bob") == b"2"
        assert one.keys("policy/app") == two.keys("policy/app") == ["carol", "bob", "alice"]
        assert two.trim("policy/app", 1) == 2 and one.keys("policy/app") == ["carol"]
    finally:
        one.close()
        two.close()


def test_a_state_table_on_redis_reads_off_the_loop(loop, redis_server):
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}")
    try:
        store.save_many([("policy/app", "alice", encode_state("exp4", {"logw": {"a": -1.0}, "updates": 3}))])
        store.flush()
        t = StateTable(store, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop)
        got = []
        t.fetch("alice", lambda s, known: got.append((s, known, threading.current_thread())))
        assert got == []
        _run_until(loop, lambda: got)
        assert got == [({"logw": {"a": -1.0}, "updates": 3}, True, threading.main_thread())]
    finally:
        store.close()


def test_writes_wait_out_a_redis_outage_and_reads_fail_fast_meanwhile(loop, redis_factory):
    server = redis_factory()
    store = RedisStore(server.url, prefix="p", timeout_s=0.3)
    try:
        store.save_many([("policy/app", "alice", encode_state("exp4", {"logw": {}, "updates": 1}))])
        store.flush()
        os.kill(server.proc.pid, signal.SIGSTOP)  # the server stops answering (not even closing sockets)
        try:
            store.save_many([("policy/app", "bob", b"kept")])
            assert store.load("policy/app", "bob") == b"kept"  # the overlay answers while it waits
            assert not store.flush(timeout=1.0)  # not applied: the server does not answer
            assert store.write_errors >= 1 and not store.available
            t = StateTable(store, "app", "exp4", _init, max_in_memory=10, max_states=100, loop=loop,
                           load_timeout_s=60.0)  # (the store's own 0.3 s timeout must end the read)
            got = []
            t.fetch("alice", lambda s, known: got.append((s, known)))
            _run_until(loop, lambda: got, timeout=20.0)
            assert got == [(INIT, False)] and t.peek("alice") is None  # the read failed: fresh, not kept
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert store.flush(timeout=10.0) and store.available  # the queued write went through
        assert server.client().hget("p:v:policy/app", "bob") == b"kept"
        assert store.keys("policy/app") == ["bob", "alice"]
    finally:
        store.close()


def test_many_reads_at_once_share_round_trips_and_all_succeed(loop, redis_server):
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}")
    try:
        store.save_many([("policy/app", f"u{i}", b"%d" % i) for i in range(0, 300, 2)])
        store.flush()
        got = {}
        for i in range(300):  # a burst of users not in memory (after a restart, say)
            store.load_later("policy/app", f"u{i}", lambda v, e, i=i: got.__setitem__(i, (v, e)))
        deadline = time.monotonic() + 10
        while len(got) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) == 300 and all(e is None for _, e in got.values())
        assert all(got[i][0] == (b"%d" % i if i % 2 == 0 else None) for i in range(300))
    finally:
        store.close()


def test_a_batch_the_server_refuses_is_dropped_and_the_writes_behind_it_go_on(redis_server):
    prefix = f"t{uuid.uuid4().hex}"
    redis_server.client().set(f"{prefix}:v:broken", b"a string where a hash should be")
    store = RedisStore(redis_server.url, prefix=prefix)
    try:
        store.save_many([("broken", "k", b"v")])
        assert store.flush(timeout=5.0)  # not retried forever
        assert store.failed_writes == 1
        store.save_many([("fine", "k", b"v")])
        assert store.flush(timeout=5.0) and store.load("fine", "k") == b"v"
        assert redis_server.client().hget(f"{prefix}:v:fine", "k") == b"v"
    finally:
        store.close()


def test_a_namespace_being_removed_reads_empty_and_then_as_the_server_says(redis_server):
    prefix = f"t{uuid.uuid4().hex}"
    store = RedisStore(redis_server.url, prefix=prefix)
    try:
        store.save_many([("policy/app", "old", b"old-state"), ("policy/app", "kept", b"x")])
        store.flush()
        store.save_many([("other", "k", b"v")] * 50)  # writes queued ahead of the removal
        store.delete_namespace("policy/app")
        assert store.load("policy/app", "old") is None and store.load("policy/app", "kept") is None
        store.flush()
        redis_server.client().hset(f"{prefix}:v:policy/app", "kept", b"written by another frontend")
        assert store.load("policy/app", "kept") == b"written by another frontend"  # no mark left behind
    finally:
        store.close()


def test_an_unreachable_redis_stops_the_start_with_a_clear_error(tmp_path):
    from clipper.errors import InvalidConfigError

    before = {t for t in threading.enumerate() if t.name == "clipper-redis"}
    with pytest.raises(InvalidConfigError, match="did not answer"):
        RedisStore(f"unix://{tmp_path}/nobody.sock", timeout_s=0.3)
    with pytest.raises(InvalidConfigError, match="not a redis"):
        RedisStore("http://example.invalid/")
    assert {t for t in threading.enumerate() if t.name == "clipper-redis"} == before  # nothing left running


def test_frontends_on_one_redis_share_the_registry_and_the_policy_states(redis_factory, frontend_factory):
    prefix_url = redis_factory().url  # a server of its own: the frontends use the default key prefix
    models = [("right", "first_as_label", None), ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})]
    first = frontend_factory(state_path=prefix_url)
    assert "RedisStore" in first.stats()["states"]["store"]
    first.deploy_ensemble("shared", models, output_kind="label")
    with Client("127.0.0.1", first.port) as c:
        for i in range(1, 5):
            c.feedback("shared", np.array([i, 0, 0, 0], np.float32), i, user="carol")
    before = first.state("shared", "carol")
    assert before["updates"] == 4
    first.close()  # its last states are written to Redis
    second = frontend_factory(state_path=prefix_url)  # another frontend: the registry comes from Redis
    for model, _, _ in models:
        second.call(second.fe.wait_ready(model, "1", timeout_s=60))
    assert second.state("shared", "carol") == before
    with Client("127.0.0.1", second.port) as c:
        p = c.predict("shared", np.array([3, 0, 0, 0], np.float32), user="carol")
    assert p.output == 3 and not p.is_default


# ------------------------------------------------------------------ several frontends, one user's state
from clipper.store.states import decode_state, merge_states  # noqa: E402


def test_merge_adds_what_this_frontend_learned_to_what_the_store_holds():
    base = encode_state("exp4", {"logw": {"a": 0.0, "b": -1.0}, "updates": 2})
    other = encode_state("exp4", {"logw": {"a": -0.5, "b": -1.0}, "updates": 3})  # another frontend's step
    mine = encode_state("exp4", {"logw": {"a": 0.0, "b": -1.25}, "updates": 3})  # this one's, from base
    assert decode_state(merge_states(other, base, mine)) == (
        "exp4", {"logw": {"a": -0.5, "b": -1.25}, "updates": 4})
    assert merge_states(None, base, mine) == mine  # nothing stored: mine
    assert decode_state(merge_states(base, base, mine))[1] == decode_state(mine)[1]  # nobody else wrote: mine
    # no base (a user this frontend found fresh): its numbers count whole
    fresh = encode_state("exp4", {"logw": {"a": -0.25}, "updates": 1})
    assert decode_state(merge_states(other, None, fresh))[1] == {"logw": {"a": -0.75, "b": -1.0}, "updates": 4}
    # another policy's state, or non-numbers: the last write wins
    ucb = encode_state("ucb1", {"n": {"a": 1.0}})
    assert merge_states(ucb, base, mine) == mine
    inf = encode_state("exp4", {"logw": {"a": float("-inf")}, "updates": 3})
    assert decode_state(merge_states(other, base, inf))[1]["logw"]["a"] == float("-inf")


@settings(max_examples=200, deadline=None)
@given(start=st.dictionaries(st.sampled_from("abc"), st.integers(-1000, 1000), max_size=3),
       steps=st.lists(st.tuples(st.booleans(), st.sampled_from("abc"), st.integers(-50, 50)), max_size=12))
def test_concurrent_steps_merged_in_any_interleaving_all_count(start, steps):
    # two writers, each adding integer steps to its own copy read at some point, writing with its base:
    # whatever the interleaving, the stored value is the start plus every step
    stored = encode_state("p", dict(start))
    copies = [(stored, dict(start)), (stored, dict(start))]  # (base, mine) per writer
    for who, key, step in steps:
        base, mine = copies[who]
        mine = dict(mine)
        mine[key] = mine.get(key, 0) + step
        new = encode_state("p", mine)
        stored = merge_states(stored, base, new)
        copies[who] = (new, mine)  # what it wrote is its next base (its memory keeps its own view)
    total = dict(start)
    for _, key, step in steps:
        total[key] = total.get(key, 0) + step
    got = decode_state(stored)[1]
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in total.items() if v}


def test_two_frontends_learning_about_one_user_lose_no_update(redis_server):
    from clipper.query.processor import QueryProcessor
    from clipper.selection import make_policy

    prefix = f"t{uuid.uuid4().hex}"
    loops = [asyncio.new_event_loop() for _ in range(2)]
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    try:
        procs = [QueryProcessor(lp, 1024, 0, store=s) for lp, s in zip(loops, stores)]
        policy = make_policy("exp4", ["a", "b"])
        tables = [p.state_table("app", policy) for p in procs]

        def read(i):  # as the query path does: memory, else a read off the loop
            st_ = tables[i].peek("carol")
            if st_ is None:
                got = []
                tables[i].fetch("carol", lambda s, known: got.append(s))
                _run_until(loops[i], lambda: got)
                st_ = got[0]
            return st_

        for rnd in range(20):
            for i in range(2):
                s = read(i)
                tables[i].put("carol", {"logw": {"a": s["logw"]["a"] - 0.125, "b": s["logw"]["b"]},
                                        "updates": s["updates"] + 1})
                if rnd % 3 != i:  # each writes behind the other's back now and then
                    procs[i].flush_states()
            for i in range(2):
                loops[i].run_until_complete(asyncio.sleep(0.002))  # merged states come back into memory
        for i in range(2):
            procs[i].flush_states()
            stores[i].flush()
            loops[i].run_until_complete(asyncio.sleep(0.01))
        stored = decode_state(stores[0].load("policy/app", "carol"))[1]
        assert stored["updates"] == 40 and stored["logw"]["a"] == pytest.approx(-0.125 * 40)
    finally:
        for s in stores:
            s.close()
        for lp in loops:
            lp.close()


def test_a_drain_answers_a_request_still_waiting_for_its_state(frontend_factory, wire_conn, tmp_path):
    from clipper.protocol import wire

    fe = frontend_factory(state_path=str(tmp_path / "state.sqlite"), state_load_timeout_ms=60_000)
    fe.deploy_ensemble("slowstate", [("right", "first_as_label", None),
                                     ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})],
                       output_kind="label", slo_ms=60_000)
    release = fe.call(lambda: _hold_writer_nowait(fe.fe.store))
    try:
        assert release[1].wait(10)
        c = wire_conn(fe.port)
        c.send(wire.predict(1, "slowstate", np.array([3, 0, 0, 0], np.float32), {"user": "gina"}))
        fe.wait_until(lambda s: s["states"]["waiting_for_state"] == 1, what="the request to wait for its state")
        assert asyncio.run_coroutine_threadsafe(fe.fe.drain(0.2), fe.loop).result(30) == 1
        (msg,) = c.recv(1, timeout=10)
        assert msg[0] == wire.ERROR and msg[2] == E.ShuttingDownError.code
        assert fe.stats()["states"]["waiting_for_state"] == 0
    finally:
        release[0].set()


def test_a_frontend_that_lost_redis_serves_queries_and_refuses_management_changes(redis_factory, frontend_factory):
    from clipper.management.admin_client import AdminClient

    server = redis_factory()
    fe = frontend_factory(state_path=server.url)
    fe.deploy("kept", "constant", env={"CLIPPER_TEST_CONST": "5"})
    admin = AdminClient("127.0.0.1", fe.fe.admin_port, timeout=30)
    x = np.array([1, 0, 0, 0], np.float32)
    os.kill(server.proc.pid, signal.SIGSTOP)  # Redis stops answering
    try:
        with pytest.raises(E.StateUnavailableError, match="management changes are refused"):
            admin.register_application("new", "float32", [4])
        assert "new" not in fe.fe.registry.applications  # nothing changed
        assert admin.get_all_apps()  # reading is fine
        with Client("127.0.0.1", fe.port) as c:
            p = c.predict("kept", x)  # queries go on
        assert p.output == 5 and not p.is_default
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    admin.register_application("new", "float32", [4])  # Redis is back: changes are taken again
    assert fe.fe.store.flush(timeout=10)
    assert server.client().hexists("clipper:v:registry/app", "new")


def test_frontends_on_one_redis_see_each_others_management_changes(redis_factory, frontend_factory):
    server = redis_factory()
    feed = server.client().pubsub()
    feed.subscribe("clipper:registry-changes")  # what the frontends announce, heard from outside
    a = frontend_factory(state_path=server.url)
    b = frontend_factory(state_path=server.url)

    def wait_for(pred, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not b.call(pred):
            assert time.monotonic() < deadline, f"frontend b never saw {what}"
            time.sleep(0.02)

    x = np.array([1, 0, 0, 0], np.float32)
    t0 = time.monotonic()
    a.deploy("seen", "constant", env={"CLIPPER_TEST_CONST": "7"})  # register, deploy, link, on a
    wait_for(lambda: "seen" in b.fe.registry.applications and b.fe.registry.links.get("seen"), "the application")
    b.call(b.fe.wait_ready("seen-model", "1", timeout_s=60))  # b runs the model's replicas itself
    with Client("127.0.0.1", b.port) as c:
        p = c.predict("seen", x)
    assert p.output == 7 and not p.is_default
    assert b.fe.syncs >= 1 and time.monotonic() - t0 < 60
    # a new version made current on a reaches b; then the application's removal does
    from clipper.management.registry import ModelVersion

    a.call(a.fe.deploy_model(ModelVersion("seen-model", "2", "float32", [4], entry="model_zoo.py:constant",
                                          env={"CLIPPER_TEST_CONST": "8"}), wait=True, timeout_s=60))
    wait_for(lambda: (m := b.fe.registry.models.get("seen-model")) is not None and m.current_version == "2",
             "version 2 made current")
    b.call(b.fe.wait_ready("seen-model", "2", timeout_s=60))
    with Client("127.0.0.1", b.port) as c:
        assert c.predict("seen", x).output == 8
    a.call(a.fe.unregister_application("seen"))
    wait_for(lambda: "seen" not in b.fe.registry.applications, "the application removed")
    with Client("127.0.0.1", b.port) as c, pytest.raises(E.UnknownApplicationError):
        c.predict("seen", x)
    # b announced nothing: what it applied was not written back as its own change
    heard = []
    while (msg := feed.get_message(timeout=0.2)) is not None:
        if msg["type"] == "message":
            heard.append(msg["data"])
    assert heard and set(heard) == {a.fe._origin}
    feed.close()


def test_a_late_merge_answer_does_not_make_this_frontend_count_its_steps_twice(redis_server):
    from clipper.query.processor import QueryProcessor
    from clipper.selection import make_policy

    loop = asyncio.new_event_loop()
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}")
    try:
        proc = QueryProcessor(loop, 1024, 0, store=store)
        t = proc.state_table("app", make_policy("exp4", ["a", "b"]))
        step = lambda: t.put("u", {"logw": {"a": 0.0, "b": 0.0}, "updates": (t.peek("u") or {"updates": 0})["updates"] + 1})  # noqa: E731
        step()
        proc.flush_states()
        step()
        proc.flush_states()  # two merges of one user out before either answer is taken on the loop
        store.flush()
        loop.run_until_complete(asyncio.sleep(0.05))  # both answers come back, the first one late
        step()
        proc.flush_states()
        store.flush()
        loop.run_until_complete(asyncio.sleep(0.05))
        assert decode_state(store.load("policy/app", "u"))[1]["updates"] == 3
    finally:
        store.close()
        loop.close()


def test_a_merge_whose_answer_was_lost_is_not_applied_twice(redis_server):
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex}")
    try:
        base = encode_state("exp4", {"logw": {}, "updates": 10})
        store.save_many([("policy/app", "u", base)])
        store.flush()
        mine = encode_state("exp4", {"logw": {}, "updates": 11})
        job = ([("policy/app", "u", base, mine)], None, "sametoken")
        store._call(store._apply_merge(job))
        store._call(store._apply_merge(job))  # tried again, as after a reply lost with the connection
        assert decode_state(store.load("policy/app", "u"))[1]["updates"] == 11
    finally:
        store.close()


def test_a_redis_that_lost_its_data_does_not_empty_the_frontends(redis_factory, frontend_factory):
    server = redis_factory()
    a = frontend_factory(state_path=server.url)
    a.deploy("survivor", "constant", env={"CLIPPER_TEST_CONST": "3"})
    assert a.fe.store.flush(timeout=10)
    server.client().flushall()  # Redis restarted without its data, say
    server.client().client_kill_filter(_type="pubsub")  # ... so the change feed reconnects: a catch-up
    deadline = time.monotonic() + 20
    while not server.client().hexists("clipper:v:registry/app", "survivor"):
        assert time.monotonic() < deadline, "the frontend never wrote its registry again"
        time.sleep(0.02)
    assert "survivor" in a.fe.registry.applications
    with Client("127.0.0.1", a.port) as c:
        assert c.predict("survivor", np.array([1, 0, 0, 0], np.float32)).output == 3


def test_an_application_registered_anew_elsewhere_is_registered_anew_here(redis_factory, frontend_factory):
    from clipper.management.registry import Application

    server = redis_factory()
    a = frontend_factory(state_path=server.url)
    b = frontend_factory(state_path=server.url)
    a.call(a.fe.register_application(Application("redo", "float32", [4], slo_ms=100)))
    deadline = time.monotonic() + 20
    while b.call(lambda: b.fe.registry.applications.get("redo")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    a.call(a.fe.unregister_application("redo"))
    a.call(a.fe.register_application(Application("redo", "float32", [4], slo_ms=250)))
    while b.call(lambda: getattr(b.fe.registry.applications.get("redo"), "slo_ms", None)) != 250:
        assert time.monotonic() < deadline, "b kept the old definition"
        time.sleep(0.02)


def test_keys_and_credentials_issued_or_revoked_on_one_frontend_act_on_the_others(redis_factory, frontend_factory):
    from clipper.management.admin_client import AdminClient
    from clipper.management.registry import Application, ModelVersion

    server = redis_factory()
    a = frontend_factory(state_path=server.url)
    b = frontend_factory(state_path=server.url)
    a.call(a.fe.register_application(Application("keyed", "float32", [4])))
    a.call(a.fe.deploy_model(ModelVersion("handmade", "1", "float32", [4], replicas=0)))  # containers by hand
    admin = AdminClient("127.0.0.1", a.fe.admin_port, timeout=30)
    key = admin.create_api_key(["keyed"])
    cred = admin.issue_container_credentials("handmade")

    def wait_for(pred, what):
        deadline = time.monotonic() + 20
        while not b.call(pred):
            assert time.monotonic() < deadline, f"frontend b never saw {what}"
            time.sleep(0.02)

    wait_for(lambda: b.fe.api_keys.get(key["id"]) is not None, "the API key")
    wait_for(lambda: b.fe.keyring.get(cred["id"]) is not None, "the container credentials")
    held = b.call(lambda: b.fe.api_keys.get(key["id"]))
    admin.revoke_api_key(key["id"])
    admin.revoke_container_credentials(cred["id"])
    wait_for(lambda: b.fe.api_keys.get(key["id"]) is None and b.fe.keyring.get(cred["id"]) is None, "the revocations")
    assert held.revoked and not held.apps  # a connection holding it there is refused from now on


def test_a_redeploy_on_one_frontend_invalidates_the_others_cache(redis_factory, frontend_factory):
    from clipper.management.registry import ModelVersion

    server = redis_factory()
    a = frontend_factory(state_path=server.url)
    b = frontend_factory(state_path=server.url)
    a.deploy("cached", "constant", env={"CLIPPER_TEST_CONST": "7"}, cache=True)
    deadline = time.monotonic() + 60
    while b.call(lambda: b.fe.registry.links.get("cached")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    b.call(b.fe.wait_ready("cached-model", "1", timeout_s=60))
    x = np.array([1, 0, 0, 0], np.float32)
    with Client("127.0.0.1", b.port) as c:
        assert c.predict("cached", x).output == 7
        assert c.predict("cached", x).output == 7
    assert b.stats()["cache"]["hits"] >= 1  # b answers it from its cache now
    # the same version deployed again on a, with another definition
    a.call(a.fe.delete_model("cached-model", "1"))
    a.call(a.fe.deploy_model(ModelVersion("cached-model", "1", "float32", [4], entry="model_zoo.py:constant",
                                          env={"CLIPPER_TEST_CONST": "9"}), wait=True, timeout_s=60))
    a.call(a.fe.link("cached", "cached-model"))
    with Client("127.0.0.1", b.port) as c:
        while True:  # b catches up: its cached 7 must not outlive the redeploy
            try:
                out = c.predict("cached", x)
                if out.output == 9 and not out.is_default:
                    break
                assert out.output in (7, 9) or out.is_default
            except (E.NoModelAvailableError, E.DeadlineExceededError):
                pass
            assert time.monotonic() < deadline, "b kept answering from the old deployment"
            time.sleep(0.05)


def test_one_container_serves_two_frontends_and_outlives_one(redis_factory, frontend_factory, tmp_path):
    """One container process given both frontends' addresses is a replica in each (credentials issued by one
    frontend, known to the other through the store; the frontends share their server key), answers both, and
    keeps serving the second when the first stops.

    Catches: a runtime that serves only its first address, one frontend's batch answered on the other's
    socket (wrong or missing answers), a container that exits when one of its frontends goes."""
    import subprocess
    import sys

    from clipper.management.admin_client import AdminClient
    from clipper.management.registry import Application, ModelVersion
    from clipper.security.container_keys import save_credentials

    server = redis_factory()
    a = frontend_factory(state_path=server.url, heartbeat_interval_ms=100, heartbeat_timeout_ms=1000)
    b = frontend_factory(state_path=server.url, heartbeat_interval_ms=100, heartbeat_timeout_ms=1000)
    a.call(a.fe.register_application(Application("both", "float32", [4], slo_ms=20_000)))
    a.call(a.fe.deploy_model(ModelVersion("shared", "1", "float32", [4], replicas=0)))  # no local replicas
    a.call(a.fe.link("both", "shared"))
    cred = AdminClient("127.0.0.1", a.fe.admin_port, timeout=30).issue_container_credentials("shared", "1")
    save_credentials(tmp_path / "cred", cred)
    deadline = time.monotonic() + 20
    while not b.call(lambda: b.fe.keyring.get(cred["id"]) is not None and b.fe.registry.links.get("both")):
        assert time.monotonic() < deadline, "frontend b never learned the credentials and the link"
        time.sleep(0.02)
    addrs = [f"tcp://127.0.0.1:{fe.fe.rpc_port}" for fe in (a, b)]
    proc = subprocess.Popen([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "shared",
                             "--version", "1", "--credentials", str(tmp_path / "cred"), "--frontend", addrs[0],
                             "--frontend", addrs[1]], cwd=a.fe.base_dir, stderr=subprocess.PIPE, text=True)
    try:
        for fe in (a, b):
            fe.call(fe.fe.wait_ready("shared", "1", timeout_s=60))
        x = np.array([1, 2, 3, 4], np.float32)
        for fe in (a, b):
            with Client("127.0.0.1", fe.port) as c:
                got = c.predict_many("both", [x * k for k in range(1, 41)])
            assert [p.output for p in got] == [pytest.approx(10.0 * k) for k in range(1, 41)]
            assert not any(p.is_default for p in got)
        a.close()
        with Client("127.0.0.1", b.port) as c:
            got = c.predict_many("both", [x * k for k in range(1, 41)])
        assert [p.output for p in got] == [pytest.approx(10.0 * k) for k in range(1, 41)]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_eight_writers_at_once_lose_no_update_to_one_users_state(redis_server):
    """Eight query processors, each on its own thread with its own event loop and Redis connections, learn
    25 steps each about one user and flush after every step, all at once: every flush is an optimistic
    merge that may collide with the others'. All 200 steps are kept.

    Catches: plain saves (last write wins: most steps lost), a merge retried after a conflict from a stale
    base or answered twice (steps counted twice), a merged state taken back over a newer local one."""
    from clipper.query.processor import QueryProcessor
    from clipper.selection import make_policy

    n, rounds = 8, 25
    prefix = f"t{uuid.uuid4().hex}"
    policy = make_policy("exp4", ["a", "b"])
    start = threading.Barrier(n)
    errors = []

    def writer(i: int) -> None:
        loop = asyncio.new_event_loop()
        store = RedisStore(redis_server.url, prefix=prefix)
        try:
            proc = QueryProcessor(loop, 1024, 0, store=store)
            table = proc.state_table("app", policy)
            start.wait(60)
            for _ in range(rounds):
                s = table.peek("carol")
                if s is None:
                    got = []
                    table.fetch("carol", lambda st_, known: got.append(st_))  # noqa: B023 - _run_until waits for it
                    _run_until(loop, lambda: got, timeout=60)  # noqa: B023 - runs at once
                    s = got[0]
                table.put("carol", {"logw": {"a": s["logw"]["a"] - 0.125, "b": s["logw"]["b"]},
                                    "updates": s["updates"] + 1})
                proc.flush_states()
                loop.run_until_complete(asyncio.sleep(0))  # a merged state may come back into memory
            proc.flush_states()
            assert store.flush(timeout=60)
            loop.run_until_complete(asyncio.sleep(0.01))
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
        finally:
            store.close()
            loop.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    reader = RedisStore(redis_server.url, prefix=prefix)
    try:
        stored = decode_state(reader.load("policy/app", "carol"))[1]
    finally:
        reader.close()
    assert stored["updates"] == n * rounds and stored["logw"]["a"] == pytest.approx(-0.125 * n * rounds)
    assert stored["logw"]["b"] == 0


def test_redis_killed_and_restarted_under_load_queries_go_on_and_management_catches_up(redis_factory,
                                                                                        frontend_factory):
    """Two frontends on one Redis serve a steady load from two clients while Redis is killed (SIGKILL) and
    started again on the same socket and data: every query is answered by the model, management is refused
    while Redis is away (STATE_UNAVAILABLE) and taken again after, and a change made on one frontend after
    the restart reaches the other (its subscription was made anew and it caught up).

    Catches: a query path that waits on the store (answers stop or turn into errors during the outage), a
    frontend that takes management changes it cannot share, a change feed that is not resubscribed after a
    reconnect (the other frontend never learns the new application)."""
    from clipper.management.admin_client import AdminClient
    from clipper.management.registry import Application

    server = redis_factory(durable=True)
    a = frontend_factory(state_path=server.url)
    b = frontend_factory(state_path=server.url)
    a.deploy("steady", "constant", env={"CLIPPER_TEST_CONST": "4"})
    deadline = time.monotonic() + 60
    while not b.call(lambda: b.fe.registry.links.get("steady")):
        assert time.monotonic() < deadline, "b never learned the application"
        time.sleep(0.02)
    b.call(b.fe.wait_ready("steady-model", "1", timeout_s=60))
    x = np.array([1, 0, 0, 0], np.float32)
    stop = threading.Event()
    results = {"a": [], "b": []}

    def load(name, fe):
        with Client("127.0.0.1", fe.port, timeout=30) as c:
            while not stop.is_set() and len(results[name]) < 100_000:
                try:
                    p = c.predict("steady", x)
                    results[name].append(p.output if not p.is_default else "default")
                except E.ClipperError as exc:
                    results[name].append(exc)

    threads = [threading.Thread(target=load, args=(k, fe)) for k, fe in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    admin = AdminClient("127.0.0.1", a.fe.admin_port, timeout=30)
    try:
        while min(len(r) for r in results.values()) < 50:
            time.sleep(0.01)
        server.kill()
        before = [len(r) for r in results.values()]
        deadline = time.monotonic() + 30
        while any(len(r) < n + 200 for r, n in zip(results.values(), before)):  # answers go on meanwhile
            assert time.monotonic() < deadline, "queries stopped while Redis was away"
            time.sleep(0.01)
        with pytest.raises(E.StateUnavailableError):
            admin.register_application("later", "float32", [4])
        server.start()
        deadline = time.monotonic() + 60
        while True:  # the frontend reconnects by itself; management is taken again once it has
            try:
                admin.register_application("later", "float32", [4])
                break
            except E.StateUnavailableError:
                assert time.monotonic() < deadline, "management was still refused after Redis came back"
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while "later" not in b.call(lambda: dict(b.fe.registry.applications)):
            assert time.monotonic() < deadline, "b did not catch up with a change made after the restart"
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for name, got in results.items():
        bad = [r for r in got if r != 4]
        assert not bad, f"{name}: {len(bad)} of {len(got)} queries not answered by the model: {bad[:3]}"
    assert isinstance(b.call(lambda: b.fe.registry.applications["later"]), Application)


def test_a_frontend_that_does_not_know_the_model_yet_is_asked_again(frontend_factory):
    """A container serving two frontends, one of which does not know its model yet (a frontend of the group
    still catching up with the store) and rejects it: the container keeps serving the other and says hello
    again, backing off, until the late one has the model; then it serves both.

    Catches: a container that gives up on a frontend at its first rejection (the late frontend never gets
    the replica), or that exits because one of its frontends refused it."""
    import subprocess
    import sys

    from clipper.management.registry import Application, ModelVersion

    a = frontend_factory(rpc_security="none")
    b = frontend_factory(rpc_security="none")
    for fe in (a, b):
        fe.call(fe.fe.register_application(Application("late", "float32", [4], slo_ms=20_000)))
    a.call(a.fe.deploy_model(ModelVersion("lm", "1", "float32", [4], replicas=0)))
    a.call(a.fe.link("late", "lm"))
    proc = subprocess.Popen([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "lm",
                             "--version", "1", "--frontend", f"tcp://127.0.0.1:{a.fe.rpc_port}",
                             "--frontend", f"tcp://127.0.0.1:{b.fe.rpc_port}"],
                            cwd=a.fe.base_dir, stderr=subprocess.PIPE, text=True)
    try:
        a.call(a.fe.wait_ready("lm", "1", timeout_s=60))
        deadline = time.monotonic() + 60
        while b.call(lambda: b.fe.rpc.rejected) < 1:  # b refused its hello: it does not know lm:1
            assert time.monotonic() < deadline, "b never heard from the container"
            time.sleep(0.02)
        b.call(b.fe.deploy_model(ModelVersion("lm", "1", "float32", [4], replicas=0)))  # b learns the model
        b.call(b.fe.link("late", "lm"))
        b.call(b.fe.wait_ready("lm", "1", timeout_s=60))
        x = np.array([1, 2, 3, 4], np.float32)
        for fe in (a, b):
            with Client("127.0.0.1", fe.port) as c:
                assert c.predict("late", x).output == pytest.approx(10.0)
        assert proc.poll() is None
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "rejected it" in err  # b did refuse it first
