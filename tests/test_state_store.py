"""Policy states read off the event loop: StateTable.fetch over the real stores, and a frontend whose
state store stops answering (its writer thread held) keeps serving."""

from __future__ import annotations

import asyncio
import threading

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
    release, busy = threading.Event(), threading.Event()

    def stuck(_n):
        busy.set()
        release.wait(30)

    store.trim_later("nothing", 1, stuck)
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
    fe = frontend_factory(state_path=str(tmp_path / "state.sqlite"), state_load_timeout_ms=300)
    fe.deploy_ensemble("stuck", [("right", "first_as_label", None), ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})],
                       output_kind="label")
    x = np.array([3, 0, 0, 0], np.float32)
    release = fe.call(lambda: _hold_writer_nowait(fe.fe.store))
    try:
        assert release[1].wait(10)
        with Client("127.0.0.1", fe.port) as c:
            # a user memory does not hold: the read times out, the query is answered with a fresh state
            p = c.predict("stuck", x, user="frank")
            assert not p.is_default and p.output in (0, 3)
            with pytest.raises(E.StateUnavailableError, match="nothing was learned"):
                c.feedback("stuck", x, 3, user="frank")
        st = fe.stats()
        assert st["applications"]["stuck"]["states"]["load_failures"] == 2
        assert st["states"]["waiting_for_state"] == 0
    finally:
        release[0].set()
    with Client("127.0.0.1", fe.port) as c:
        c.feedback("stuck", x, 3, user="frank")  # the store answers again: learned
    assert fe.state("stuck", "frank")["updates"] == 1


def _hold_writer_nowait(store):
    """_hold_writer from the frontend's loop (which must not wait): (release, busy) events."""
    release, busy = threading.Event(), threading.Event()

    def stuck(_n):
        busy.set()
        release.wait(30)

    store.trim_later("nothing", 1, stuck)
    return release, busy
