"""Containers that die or hang lose no query: retried elsewhere, or a clear error."""

import os
import signal
import time

import numpy as np
import pytest

from clipper import errors as E
from clipper.protocol import wire


def _wait_for(pred, timeout=20.0, what="condition"):
    """Poll a cheap predicate of the system under test until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Gates:
    """The marks and gates of ``model_zoo.gated`` in one folder."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.env = {"CLIPPER_TEST_MARK_DIR": str(folder)}

    def batches(self) -> list[tuple[int, list[float]]]:
        """Every batch a container started, as (pid, x[0] of its inputs), in the order each container ran them."""
        out = []
        for f in self.folder.glob("*.batch"):
            pid, n, _ = f.name.split(".")
            out.append((int(pid), int(n), [float(v) for v in f.read_text().split(",")]))
        return [(pid, xs) for pid, _, xs in sorted(out)]

    def wait_batch(self, x0: float, timeout: float = 30.0) -> int:
        """The pid of the first container seen to start a batch holding input ``x0``."""
        return _wait_for(lambda: next((pid for pid, xs in self.batches() if x0 in xs), None), timeout,
                         what=f"a batch holding input {x0} to start")

    def open(self, k: int = 1) -> None:
        (self.folder / f"gate-{k}").touch()


def _gx(x0: float, hold: int = 0, count: int = 0) -> np.ndarray:
    """An input of ``model_zoo.gated``: answered ``x0``, its batch held at gate ``hold``, one output
    too many (``count`` 1) or too few (-1) for its batch."""
    return np.array([x0, hold, count, 0], np.float32)


def _holder(frontend, key):
    """The pid of the replica holding a batch of model ``key``, once one does."""
    return frontend.call(lambda: next((r.pid for r in frontend.fe.rpc.replicas.values()
                                       if r.key == key and r.batch is not None), None))


def _kill_and_wait_dropped(frontend, key, pid) -> None:
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: pid not in frontend.replica_pids(key), what=f"the killed replica (pid {pid}) to be dropped")


def test_killed_mid_batch_is_retried_on_another_replica(frontend, wire_conn, tmp_path):
    """Every batch waits at a gate the test opens only once the killed replica is gone, so the kill always
    lands mid-batch: the killed container's inputs are computed again by another one and answered.
    Caught mutation: a lost batch failed instead of retried (CONTAINER_FAILED instead of results)."""
    gates = Gates(tmp_path)
    mv = frontend.deploy("sleepy", "gated", replicas=2, max_batch=4, batching="fixed", cache=False, env=gates.env)
    c = wire_conn(frontend.port)
    xs = [1.0, 2.0, 3.0]
    for i, x0 in enumerate(xs):
        c.send(wire.predict(i, "sleepy", _gx(x0, hold=1)))
    victim = gates.wait_batch(1.0)
    (held,) = [b for pid, b in gates.batches() if pid == victim]
    _kill_and_wait_dropped(frontend, mv.key, victim)
    gates.open(1)
    out = {m[1]: m for m in c.recv(3, timeout=30)}
    assert [(out[i][0], out[i][3], out[i][4]) for i in range(3)] == [(wire.RESULT, x0, False) for x0 in xs], out
    redone = [x for pid, b in gates.batches() if pid != victim for x in b]
    assert set(held) <= set(redone), gates.batches()


def test_killed_mid_batch_without_retries_fails_with_a_clear_error(frontend_factory, wire_conn, tmp_path):
    gates = Gates(tmp_path)
    fe = frontend_factory(max_batch_retries=0)
    fe.deploy("sleepy", "gated", replicas=1, cache=False, env=gates.env)
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "sleepy", _gx(1.0, hold=1)))
    victim = gates.wait_batch(1.0)
    os.kill(victim, signal.SIGKILL)
    msg = c.recv(1, timeout=10)[0]
    assert msg[0] == wire.ERROR and msg[2] == E.ContainerFailedError.code
    assert f"pid {victim}" in msg[4] and "exited" in msg[4]
    assert [pid for pid, _ in gates.batches()] == [victim]  # no other container ran it


def test_restarted_container_takes_the_retried_batch(frontend, wire_conn, tmp_path):
    """The only replica is killed while its batch waits at the gate; the manager's new container runs
    that batch again. Caught mutation: no retry (CONTAINER_FAILED)."""
    gates = Gates(tmp_path)
    mv = frontend.deploy("sleepy", "gated", replicas=1, cache=False, env=gates.env)
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "sleepy", _gx(1.0, hold=1)))
    victim = gates.wait_batch(1.0)
    _kill_and_wait_dropped(frontend, mv.key, victim)
    gates.open(1)
    msg = c.recv(1, timeout=30)[0]
    assert msg[0] == wire.RESULT and msg[3] == 1.0
    (new,) = frontend.replica_pids(mv.key)
    assert new != victim
    assert sorted(gates.batches(), key=lambda b: b[0] != victim) == [(victim, [1.0]), (new, [1.0])]


def test_killed_with_two_batches_out_both_are_retried_on_the_restarted_container(frontend_factory, wire_conn,
                                                                                tmp_path):
    """batches_in_flight = 2: with batches of one, the second query is sent while the first
    waits at the gate, so the kill lands while both are out. Caught mutation: only the first (or only
    the second) lost batch retried (its query gets CONTAINER_FAILED or waits for its deadline)."""
    frontend = frontend_factory(batches_in_flight=2)
    gates = Gates(tmp_path)
    mv = frontend.deploy("sleepy", "gated", replicas=1, max_batch=1, batching="fixed", cache=False, env=gates.env)
    c = wire_conn(frontend.port)
    xs = [1.0, 2.0, 3.0]
    for i, x0 in enumerate(xs):
        c.send(wire.predict(i, "sleepy", _gx(x0, hold=1 if i == 0 else 0)))

    def both_out():
        return frontend.call(lambda: next((r.pid for r in frontend.fe.rpc.replicas.values() if r.key == mv.key
                                           and r.batch is not None and r.batch2 is not None), None))

    victim = _wait_for(both_out, what="two batches out to one replica")
    gates.wait_batch(1.0)
    _kill_and_wait_dropped(frontend, mv.key, victim)
    gates.open(1)
    out = {m[1]: m for m in c.recv(3, timeout=30)}
    assert [(out[i][0], out[i][3], out[i][4]) for i in range(3)] == [(wire.RESULT, x0, False) for x0 in xs], out
    # every input was computed by the restarted container, in order: the two lost batches and the one queued
    (new,) = frontend.replica_pids(mv.key)
    assert [b for pid, b in gates.batches() if pid == new] == [[1.0], [2.0], [3.0]]
    assert [b for pid, b in gates.batches() if pid == victim] == [[1.0]]
    stats = frontend.call(frontend.fe.rpc.stats)
    assert [(s["pid"], s["batches_done"]) for s in stats if s["model"] == mv.key] == [(new, 3)]


def test_hung_container_is_dropped_after_the_batch_timeout(frontend_factory, wire_conn):
    fe = frontend_factory(batch_timeout_ms=500, max_batch_retries=0)
    mv = fe.deploy("sleepy", "sleep_by_input", replicas=1)
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "sleepy", np.array([60.0, 0, 0, 0], np.float32)))
    msg = c.recv(1, timeout=10)[0]
    assert msg[0] == wire.ERROR and msg[2] == E.ContainerFailedError.code and "held a batch" in msg[4]
    # the hung process was killed and replaced
    fe.call(fe.fe.wait_ready(mv.name, mv.version, timeout_s=30))
    c.send(wire.predict(2, "sleepy", np.array([0.0, 1, 0, 0], np.float32)))
    assert c.recv(1)[0][3] == 0.0


def test_long_predict_keeps_its_container_alive(frontend_factory, wire_conn, tmp_path):
    """predict runs inline on the container's main thread; its heartbeat thread must keep the frontend
    from taking a predict three heartbeat timeouts long for a silent container. The timeout is a wide
    1 s (a loaded machine delays a beat by far less), and the batch is held at a gate for 3 s counted
    from when the container started it. Caught mutation: the heartbeat thread not beating while
    predict runs (the replica is dropped, the query retried on a new container)."""
    gates = Gates(tmp_path)
    fe = frontend_factory(heartbeat_interval_ms=100, heartbeat_timeout_ms=1000, max_batch_retries=0)
    fe.deploy("sleepy", "gated", replicas=1, cache=False, env=gates.env)
    before = fe.call(fe.fe.rpc.stats)
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "sleepy", _gx(1.0, hold=1)))
    gates.wait_batch(1.0)
    held_until = time.monotonic() + 3.0
    while time.monotonic() < held_until:
        ids = [r["replica_id"] for r in fe.call(fe.fe.rpc.stats)]
        assert ids == [before[0]["replica_id"]], f"the busy replica was dropped: replicas now {ids}"
        time.sleep(0.05)
    gates.open(1)
    msg = c.recv(1, timeout=10)[0]
    assert msg[0] == wire.RESULT and msg[3] == 1.0
    (after,) = fe.call(fe.fe.rpc.stats)
    assert (after["replica_id"], after["pid"], after["batches_done"]) == (before[0]["replica_id"], before[0]["pid"], 1)


def test_stopped_frontend_leaves_no_container_behind(frontend_factory):
    fe = frontend_factory()
    mv = fe.deploy("sum", "row_sum", replicas=2)
    pids = fe.replica_pids(mv.key)
    assert len(pids) == 2
    fe.close()
    fe.close = lambda: None  # already closed for the fixture

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    _wait_for(lambda: all(gone(p) for p in pids), timeout=10, what="containers to exit")


def test_container_that_cannot_load_fails_the_deploy_clearly(frontend):
    from clipper.management.registry import Application, ModelVersion

    frontend.call(frontend.fe.register_application(Application("x", "float32", (4,))))
    mv = ModelVersion("broken", "1", "float32", (4,), entry="model_zoo.py:no_such_function")
    frontend.call(frontend.fe.deploy_model(mv))
    with pytest.raises(E.NoModelAvailableError, match="has no attribute 'no_such_function'"):
        frontend.call(frontend.fe.wait_ready("broken", "1", timeout_s=30))


# ------------------------------------------------------------------ a model that fails a batch of several
def _batch_of_three_behind_a_held_one(frontend, c, gates, mv, third_x0: float, third_count: int = 0) -> None:
    """Query 0 is held in the container (gate 1) while queries 1-3 queue behind it; gate 1 opens and the
    three leave as one batch, held at gate 2; query 4 then queues behind that batch."""
    c.send(wire.predict(0, "g", _gx(1.0, hold=1)))
    gates.wait_batch(1.0)
    for i, x in ((1, _gx(2.0, hold=2)), (2, _gx(third_x0, count=third_count)), (3, _gx(4.0))):
        c.send(wire.predict(i, "g", x))
    frontend.wait_until(lambda s: s["models"][mv.key]["queue_length"] == 3, what="three queries queued")
    gates.open(1)
    assert c.recv(1)[0][:4] == [wire.RESULT, 0, 1, 1.0]
    gates.wait_batch(2.0)
    c.send(wire.predict(4, "g", _gx(5.0)))
    frontend.wait_until(lambda s: s["models"][mv.key]["queue_length"] == 1, what="query 4 queued")
    gates.open(2)


def test_a_predict_that_raises_fails_every_query_of_its_batch_and_nothing_else(frontend, wire_conn, tmp_path):
    """The batch [2, -3, 4] raises: its three queries get the model's error; query 4, queued behind the
    batch, is answered. Caught mutations: failing only the batch's first query (the other two are left
    waiting); failing the queue's waiting queries with the batch (query 4 gets an error)."""
    gates = Gates(tmp_path)
    mv = frontend.deploy("g", "gated", max_batch=8, batching="fixed", cache=False, env=gates.env)
    (pid,) = frontend.replica_pids(mv.key)
    c = wire_conn(frontend.port)
    _batch_of_three_behind_a_held_one(frontend, c, gates, mv, -3.0)
    out = {m[1]: m for m in c.recv(4, timeout=20)}
    assert gates.batches() == [(pid, [1.0]), (pid, [2.0, -3.0, 4.0]), (pid, [5.0])]
    for i in (1, 2, 3):
        assert out[i][0] == wire.ERROR and out[i][2] == E.ModelError.code, out[i]
        assert "ValueError: negative first value -3.0" in out[i][4]
    assert out[4][0] == wire.RESULT and out[4][3] == 5.0
    assert frontend.replica_pids(mv.key) == [pid]  # a model's exception costs no container


@pytest.mark.parametrize("extra", [1, -1], ids=["one-too-many", "one-too-few"])
def test_a_wrong_output_count_fails_every_query_of_its_batch_and_nothing_else(frontend, wire_conn, tmp_path,
                                                                                extra):
    """predict answers the batch [2, 3, 4] with 4 (or 2) outputs: none of them is taken for any query's
    answer; all three get WRONG_OUTPUT_COUNT naming the batch's size; query 4, queued behind, is
    answered. Caught mutation: the container SDK's count check removed (zip pairs the first outputs
    with the first queries: results instead of errors, or a query left waiting)."""
    gates = Gates(tmp_path)
    mv = frontend.deploy("g", "gated", max_batch=8, batching="fixed", cache=False, env=gates.env)
    c = wire_conn(frontend.port)
    _batch_of_three_behind_a_held_one(frontend, c, gates, mv, 3.0, third_count=extra)
    out = {m[1]: m for m in c.recv(4, timeout=20)}
    assert [xs for _, xs in gates.batches()] == [[1.0], [2.0, 3.0, 4.0], [5.0]]
    for i in (1, 2, 3):
        assert out[i][0] == wire.ERROR and out[i][2] == E.WrongOutputCountError.code, out[i]
        assert f"returned {3 + extra} outputs for a batch of 3 inputs" in out[i][4]
    assert out[4][0] == wire.RESULT and out[4][3] == 5.0


# ------------------------------------------------------------------ a container that goes silent mid-batch
def test_a_silent_container_mid_batch_is_dropped_and_its_batch_answered_by_another_replica(
        frontend_factory, wire_conn, tmp_path):
    """A container SIGSTOPped while it holds a batch stops sending heartbeats: after heartbeat_timeout_ms
    it is dropped and its batch runs again on the other replica. Caught mutation: the heartbeat check
    skipped (the stopped replica holds its batch for good: no answer)."""
    fe = frontend_factory(heartbeat_timeout_ms=1500)
    gates = Gates(tmp_path)
    mv = fe.deploy("g", "gated", replicas=2, max_batch=8, batching="fixed", cache=False, env=gates.env)
    c = wire_conn(fe.port)
    xs = [1.0, 2.0, 3.0]
    for i, x0 in enumerate(xs):
        c.send(wire.predict(i, "g", _gx(x0, hold=1)))
    victim = gates.wait_batch(1.0)
    os.kill(victim, signal.SIGSTOP)
    try:
        held = next(b for pid, b in gates.batches() if pid == victim)
        gates.open(1)  # the other replica may answer now; the stopped one cannot
        out = {m[1]: m for m in c.recv(3, timeout=30)}
        assert [(out[i][0], out[i][3]) for i in range(3)] == [(wire.RESULT, x0) for x0 in xs], out
        assert victim not in fe.replica_pids(mv.key)
        # what the victim held was computed again, by the other container
        (survivor,) = {pid for pid, _ in gates.batches()} - {victim}
        redone = [x for pid, b in gates.batches() if pid == survivor for x in b]
        assert set(held) <= set(redone), (held, gates.batches())
    finally:
        os.kill(victim, signal.SIGCONT)


def test_a_silent_container_mid_batch_without_retries_fails_its_queries_with_a_clear_error(
        frontend_factory, wire_conn, tmp_path):
    """With max_batch_retries = 0 every query of the silent container's batch gets CONTAINER_FAILED
    saying why, while the process is still there (stopped). Caught mutation: the heartbeat check
    skipped (no answer at all)."""
    fe = frontend_factory(heartbeat_timeout_ms=1500, max_batch_retries=0)
    gates = Gates(tmp_path)
    mv = fe.deploy("g", "gated", max_batch=8, batching="fixed", cache=False, env=gates.env, slo_ms=30_000)
    (victim,) = fe.replica_pids(mv.key)
    c = wire_conn(fe.port)
    c.send(wire.predict(0, "g", _gx(1.0, hold=1)))
    gates.wait_batch(1.0)
    for i in (1, 2):
        c.send(wire.predict(i, "g", _gx(1.0 + i)))
    fe.wait_until(lambda s: s["models"][mv.key]["queue_length"] == 2, what="two queries queued")
    os.kill(victim, signal.SIGSTOP)
    try:
        out = {m[1]: m for m in c.recv(1, timeout=30)}
        assert out[0][0] == wire.ERROR and out[0][2] == E.ContainerFailedError.code, out
        assert "went silent for over 1500 ms" in out[0][4] and f"pid {victim}" in out[0][4]
    finally:
        gates.open(1)
        os.kill(victim, signal.SIGCONT)
    # the queries that waited behind it are answered once the container, awake again, reconnects
    out = {m[1]: m for m in c.recv(2, timeout=30)}
    assert [(out[i][0], out[i][3]) for i in (1, 2)] == [(wire.RESULT, 2.0), (wire.RESULT, 3.0)], out


# ------------------------------------------------------------------ a model deleted while queries wait for it
def test_deleting_a_model_answers_every_query_waiting_for_it(frontend, wire_conn, tmp_path):
    """One query held in the container, two queued behind it, SLO a minute away: the delete answers
    all three at once with a typed error, and leaves nothing waiting. Caught mutation: the deleted
    queue's waiting queries not failed (they would wait for their deadline)."""
    gates = Gates(tmp_path)
    mv = frontend.deploy("g", "gated", max_batch=8, batching="fixed", cache=False, env=gates.env,
                         slo_ms=60_000, on_deadline="error")
    c = wire_conn(frontend.port)
    c.send(wire.predict(0, "g", _gx(1.0, hold=1)))
    gates.wait_batch(1.0)
    for i in (1, 2):
        c.send(wire.predict(i, "g", _gx(1.0 + i)))
    frontend.wait_until(lambda s: s["models"][mv.key]["queue_length"] == 2, what="two queries queued")
    assert frontend.call(frontend.fe.delete_model(mv.name)) == [mv.key]
    out = {m[1]: m for m in c.recv(3, timeout=15)}
    for i in range(3):
        assert out[i][0] == wire.ERROR and out[i][2] == E.NoModelAvailableError.code, out[i]
        assert f"model {mv.key} was deleted" in out[i][4], out[i]
    st = frontend.stats()
    assert mv.key not in st["models"] and st["applications"]["g"]["errors"] == 3
    # the application is answered at once from now on, and says why
    c.send(wire.predict(3, "g", _gx(4.0)))
    (msg,) = c.recv(1, timeout=15)
    assert msg[0] == wire.ERROR and msg[2] == E.NoModelAvailableError.code
