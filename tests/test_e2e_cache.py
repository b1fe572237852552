"""The prediction cache and adaptive batching end to end: a real frontend,
real container processes, real sockets."""

import numpy as np

from clipper import errors as E
from clipper.management.registry import Application, ModelVersion
from clipper.protocol import wire


def vec(*xs) -> np.ndarray:
    return np.array(list(xs) + [0.0] * (4 - len(xs)), np.float32)


def model_stats(st: dict, key: str) -> dict:
    return st["models"][key]


def test_repeated_input_is_answered_from_the_cache(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "sum", vec(1, 2, 3)))
    first = c.recv(1)[0]
    c.send(wire.predict(2, "sum", vec(1, 2, 3)))
    second = c.recv(1)[0]
    assert first[0] == second[0] == wire.RESULT
    assert first[3] == second[3] == 6.0 and not second[4]
    assert first[2] != second[2]  # each query has its own id
    st = frontend.stats()
    assert model_stats(st, "sum-model:1")["queries_sent"] == 1
    assert st["applications"]["sum"]["cache_hits"] == 1
    assert st["cache"]["hits"] == 1 and st["cache"]["ready"] == 1


def test_equal_inputs_in_flight_are_computed_once(frontend, wire_conn, tmp_path):
    # model_zoo.gated holds the computation at gate 1 until all five have joined it
    frontend.deploy("sleepy", "gated", max_batch=1, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    for i in range(5):
        c.send(wire.predict(i, "sleepy", vec(0.3, 1)))
    frontend.wait_until(lambda st: st["applications"]["sleepy"]["cache_joins"] == 4, what="four joins")
    (tmp_path / "gate-1").touch()
    out = c.recv(5)
    assert sorted(m[1] for m in out) == list(range(5))
    assert all(m[0] == wire.RESULT and m[3] == np.float32(0.3) and not m[4] for m in out)
    st = frontend.stats()
    assert model_stats(st, "sleepy-model:1")["queries_sent"] == 1
    assert st["applications"]["sleepy"]["cache_joins"] == 4


def test_a_failed_computation_is_not_cached(frontend, wire_conn):
    frontend.deploy("picky", "raise_on_negative", max_batch=1)
    c = wire_conn(frontend.port)
    # three equal queries at once: one computation, all three get its error
    for i in range(3):
        c.send(wire.predict(i, "picky", vec(-1)))
    out = c.recv(3)
    assert all(m[0] == wire.ERROR and m[2] == E.ModelError.code for m in out)
    # the failed entry is gone: the same input goes to the model again
    c.send(wire.predict(9, "picky", vec(-1)))
    again = c.recv(1)[0]
    assert again[0] == wire.ERROR and again[2] == E.ModelError.code
    st = frontend.stats()
    assert model_stats(st, "picky-model:1")["queries_sent"] == 2
    assert st["cache"]["fails"] == 2 and st["cache"]["entries"] == 0


def test_a_late_result_still_fills_the_cache(frontend, wire_conn, tmp_path):
    # the model answers only once gate 1 opens, after the deadline's default
    frontend.deploy("sleepy", "gated", slo_ms=150, default_output=-1.0, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "sleepy", vec(0.4, 1)))
    late = c.recv(1)[0]
    assert late[0] == wire.RESULT and late[3] == -1.0 and late[4]  # the default, at the deadline
    (tmp_path / "gate-1").touch()
    frontend.wait_until(lambda st: st["cache"]["fills"] == 1, what="the late result filling the cache")
    c.send(wire.predict(2, "sleepy", vec(0.4, 1)))
    hit = c.recv(1)[0]
    assert hit[0] == wire.RESULT and hit[3] == np.float32(0.4) and not hit[4]
    assert frontend.stats()["applications"]["sleepy"]["cache_hits"] == 1


def test_a_follower_takes_over_from_a_leader_whose_deadline_passed(frontend_factory, wire_conn, tmp_path):
    # Two applications share one model; the one with the short SLO leads the
    # computation of an input, the other joins it. The leader's deadline
    # passes while it is still queued: it is not sent, and the follower
    # (another application, a long SLO) inherits the computation. One batch in
    # flight per replica, so that the leader waits in the queue (with two, a
    # batch of one is sent behind the held one at once), and the first batch is
    # held at gate 1 until the leader's deadline has passed.
    fe = frontend_factory(batches_in_flight=1)
    fe.deploy("short", "gated", slo_ms=100, default_output=-1.0, max_batch=1, batching="fixed", model="shared",
              env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    fe.call(fe.fe.register_application(Application("long", "float32", (4,), slo_ms=10_000)))
    fe.call(fe.fe.link("long", "shared"))
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "long", vec(0.4, 1)))  # holds the only replica until gate 1 opens
    fe.wait_until(lambda st: st["models"]["shared:1"]["queries_sent"] == 1, what="the first batch sent")
    c.send(wire.predict(2, "short", vec(0.05)))  # queued: leads this input
    c.send(wire.predict(3, "long", vec(0.05)))  # joins it
    (short,) = c.recv(1)
    assert short[1] == 2 and short[4] and short[3] == -1.0  # the short SLO passed: its default
    (tmp_path / "gate-1").touch()
    out = {m[1]: m for m in c.recv(2)}
    assert out[1][3] == np.float32(0.4)
    assert out[3][0] == wire.RESULT and not out[3][4] and out[3][3] == np.float32(0.05)
    st = fe.stats()
    m = st["models"]["shared:1"]
    assert m["queries_sent"] == 2 and m["left_unsent"] == 1  # the expired leader was never sent
    assert st["applications"]["long"]["cache_joins"] == 1
    assert st["cache"]["pending"] == 0


def test_a_new_version_never_serves_the_old_versions_outputs(frontend, wire_conn):
    frontend.deploy("scaled", "Scaled", env={"CLIPPER_TEST_FACTOR": "2"}, model="scaler")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "scaled", vec(5)))
    assert c.recv(1)[0][3] == 10.0
    v2 = ModelVersion("scaler", "2", "float32", (4,), entry="model_zoo.py:Scaled",
                      env={"CLIPPER_TEST_FACTOR": "3"})
    frontend.call(frontend.fe.deploy_model(v2, wait=True, timeout_s=60))
    c.send(wire.predict(2, "scaled", vec(5)))
    assert c.recv(1)[0][3] == 15.0
    st = frontend.stats()
    assert st["models"]["scaler:1"]["queries_sent"] == 1 and st["models"]["scaler:2"]["queries_sent"] == 1


def test_an_application_can_turn_the_cache_off(frontend, wire_conn):
    frontend.deploy("fresh", "row_sum", cache=False)
    c = wire_conn(frontend.port)
    for i in range(3):
        c.send(wire.predict(i, "fresh", vec(1, 1)))
        assert c.recv(1)[0][3] == 2.0
    st = frontend.stats()
    assert st["models"]["fresh-model:1"]["queries_sent"] == 3
    assert st["applications"]["fresh"]["cache_hits"] == 0 and st["cache"]["lookups"] == 0


def test_expired_queries_are_not_sent_to_the_model(frontend, wire_conn, tmp_path):
    frontend.deploy("sleepy", "gated", slo_ms=100, default_output=-1.0, max_batch=8, batching="fixed",
                    env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    c.send(wire.predict(0, "sleepy", vec(0.4, 1)))  # holds the replica (gate 1) past every deadline below
    frontend.wait_until(lambda st: st["models"]["sleepy-model:1"]["queries_sent"] == 1, what="the first batch")
    for i in range(1, 6):
        c.send(wire.predict(i, "sleepy", vec(0.0, 0, 0, i)))
    out = c.recv(6)
    assert all(m[4] and m[3] == -1.0 for m in out)
    # Answered by default at their deadline, they left the queue then, while the replica was still busy
    # (its batch is held): the queue holds nothing answered, and their reservations were given back.
    st = frontend.stats()
    m = st["models"]["sleepy-model:1"]
    assert m["free_replicas"] == 0 and m["queue_length"] == 0 and m["queue_bytes"] == 0
    assert m["left_unsent"] == 5 and m["queries_sent"] == 1
    assert st["cache"]["pending"] == 1  # only the batch in flight still holds a reservation
    (tmp_path / "gate-1").touch()


def test_aimd_grows_the_batch_size_under_load(frontend, wire_conn):
    frontend.deploy("sum", "row_sum", max_batch=64, batching="aimd")
    c = wire_conn(frontend.port)
    n = 3000
    for i in range(n):
        c.send(wire.predict(i, "sum", vec(i)))
    out = c.recv(n, timeout=60)
    assert all(m[0] == wire.RESULT for m in out)
    st = frontend.stats()["models"]["sum-model:1"]
    assert st["queries_sent"] == n
    assert st["batch_sizes"][0] > 1 and st["mean_batch_size"] > 1, st
    assert st["batches_sent"] < n


def test_fixed_batching_keeps_its_size(frontend, wire_conn):
    frontend.deploy("sum", "row_sum", max_batch=4, batching="fixed")
    c = wire_conn(frontend.port)
    for i in range(200):
        c.send(wire.predict(i, "sum", vec(i)))
    c.recv(200)
    st = frontend.stats()["models"]["sum-model:1"]
    assert st["batch_sizes"] == [4] and st["batches_sent"] >= 50


def test_a_small_cache_budget_evicts_through_a_running_frontend(frontend_factory, wire_conn):
    """``limits.cache_bytes`` reaches the frontend's cache: with 2 KiB (about a dozen entries of a 16-byte
    input, a float output and the per-entry overhead), 60 distinct inputs evict most of what came before,
    the bytes charged stay within the budget, an evicted input goes to the model again and the newest
    one is still a hit.

    Mutations caught: ``cache_bytes`` not passed from the config to the query processor (the 32 MiB default
    evicts nothing); the cache never calling ``_evict`` (tried on the pure twin, CLIPPER_NO_EXTENSIONS=1: used
    bytes over the budget)."""
    fe = frontend_factory(cache_bytes=2048)
    fe.deploy("ev", "row_sum", max_batch=4)
    c = wire_conn(fe.port)
    for i in range(60):  # one at a time: each answer is cached before the next input arrives
        c.send(wire.predict(i, "ev", vec(i)))
        assert c.recv(1)[0][3] == float(i)
    st = fe.stats()
    cache = st["cache"]
    assert cache["budget_bytes"] == 2048 and 0 < cache["used_bytes"] <= 2048, cache
    assert cache["evictions"] >= 40 and cache["entries"] == 60 - cache["evictions"] <= 20, cache
    sent = model_stats(st, "ev-model:1")["queries_sent"]
    assert sent == 60
    c.send(wire.predict(100, "ev", vec(59)))  # the newest: still cached
    assert c.recv(1)[0][3] == 59.0
    c.send(wire.predict(101, "ev", vec(0)))  # the oldest: evicted, computed again
    assert c.recv(1)[0][3] == 0.0
    st = fe.stats()
    assert model_stats(st, "ev-model:1")["queries_sent"] == 61 and st["applications"]["ev"]["cache_hits"] == 1
