"""End to end: a real frontend, real container processes, real sockets."""

import numpy as np
import pytest

from clipper import errors as E
from clipper.protocol import wire


def test_predict_end_to_end(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    c = wire_conn(frontend.port)
    xs = [np.arange(4, dtype=np.float32) * i for i in range(50)]
    for i, x in enumerate(xs):
        c.send(wire.predict(i, "sum", x))
    replies = {m[1]: m for m in c.recv(50)}
    for i, x in enumerate(xs):
        kind, rid, qid, output, is_default = replies[i][:5]
        assert kind == wire.RESULT and not is_default
        assert output == pytest.approx(float(x.sum()))
    assert len({m[2] for m in replies.values()}) == 50  # distinct query ids


def test_list_input_is_converted_leniently(frontend, wire_conn):
    frontend.deploy("sum", "row_sum")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "sum", [1, 2, 3, 4]))  # ints for a float32 app
    c.send(wire.predict(2, "sum", [0.5, 0.5, 1, 1]))
    out = {m[1]: m for m in c.recv(2)}
    assert out[1][3] == 10.0 and out[2][3] == 3.0


def test_class_entry_with_load_step(frontend, wire_conn):
    frontend.deploy("scaled", "Scaled", env={"CLIPPER_TEST_FACTOR": "3"})
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "scaled", np.array([2, 0, 0, 0], np.float32)))
    assert c.recv(1)[0][3] == 6.0


def test_bytes_application_and_mixed_outputs(frontend, wire_conn):
    frontend.deploy("rev", "reverse_bytes", dtype="bytes", shape=())
    frontend.deploy("desc", "describe", model="desc-model")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "rev", b"abc"))
    c.send(wire.predict(2, "rev", "a str for a bytes app"))
    c.send(wire.predict(3, "desc", np.zeros(4, np.float32)))
    out = {m[1]: m for m in c.recv(3)}
    assert out[1][3] == b"cba"
    assert out[2][0] == wire.ERROR and out[2][2] == E.InvalidInputError.code
    desc = out[3][3]
    assert desc["label"] == "row-0" and desc["vec"].dtype == np.float32 and list(desc["vec"]) == [0, 1, 2]


def test_str_application_batches_travel_as_one_buffer(frontend, wire_conn):
    frontend.deploy("shout", "shout", dtype="str", shape=(), max_batch=16, batching="fixed")
    c = wire_conn(frontend.port)
    words = ["héllo", "", "wörld" * 50] + [f"w{i}" for i in range(30)]
    for i, w in enumerate(words):
        c.send(wire.predict(i, "shout", w))
    out = {m[1]: m for m in c.recv(len(words))}
    assert [out[i][3] for i in range(len(words))] == [f"{w.upper()}:str" for w in words]


def test_pipelining_out_of_order_completion(frontend_factory, wire_conn, tmp_path):
    # Two replicas, batches of one, one batch in flight each (with two, a fast query could be sent
    # behind the held one): the slow query is held in one replica (model_zoo.gated, gate 1) until the
    # five fast ones, through the other replica, have been answered: replies overtake it. A connection
    # that answered in order would never send them (the gate opens after).
    frontend = frontend_factory(batches_in_flight=1)
    frontend.deploy("sleepy", "gated", replicas=2, max_batch=1, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    c.send(wire.predict(100, "sleepy", np.array([0.5, 1, 0, 0], np.float32)))
    for i in range(5):
        c.send(wire.predict(i, "sleepy", np.array([0.0, 0, 0, i], np.float32)))
    fast = c.recv(5, timeout=20)
    assert sorted(m[1] for m in fast) == [0, 1, 2, 3, 4]
    (tmp_path / "gate-1").touch()
    (slow,) = c.recv(1)
    assert slow[1] == 100 and slow[3] == 0.5


def test_predict_that_raises_fails_only_its_batch(frontend, wire_conn):
    frontend.deploy("picky", "raise_on_negative", max_batch=1)
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "picky", np.array([-1, 0, 0, 0], np.float32)))
    c.send(wire.predict(2, "picky", np.array([5, 0, 0, 0], np.float32)))
    out = {m[1]: m for m in c.recv(2)}
    assert out[1][0] == wire.ERROR and out[1][2] == E.ModelError.code
    assert "ValueError: negative pixel -1.0" in out[1][4]
    assert out[2][0] == wire.RESULT and out[2][3] == 5.0
    # the container keeps serving
    c.send(wire.predict(3, "picky", np.array([7, 0, 0, 0], np.float32)))
    assert c.recv(1)[0][3] == 7.0


def test_wrong_output_count(frontend, wire_conn):
    frontend.deploy("wrong", "wrong_count")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "wrong", np.zeros(4, np.float32)))
    msg = c.recv(1)[0]
    assert msg[0] == wire.ERROR and msg[2] == E.WrongOutputCountError.code
    assert "returned 2 outputs for a batch of 1 inputs" in msg[4]


def test_default_output_at_deadline(frontend, wire_conn, tmp_path):
    # The model holds the query at a gate opened only after the answer (model_zoo.gated), not a sleep
    # that a loaded machine could outlast: only the deadline can have answered it.
    frontend.deploy("late", "gated", slo_ms=100, default_output=-1.0, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "late", np.array([1.0, 1, 0, 0], np.float32)))
    msg = c.recv(1, timeout=30)[0]
    (tmp_path / "gate-1").touch()
    assert msg[0] == wire.RESULT and msg[3] == -1.0 and msg[4] is True
    assert "100 ms SLO" in msg[5]["explanation"]


def test_deadline_error_when_the_app_asks_for_it(frontend, wire_conn, tmp_path):
    frontend.deploy("late", "gated", slo_ms=100, on_deadline="error", env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "late", np.array([1.0, 1, 0, 0], np.float32)))
    msg = c.recv(1, timeout=30)[0]
    (tmp_path / "gate-1").touch()
    assert msg[0] == wire.ERROR and msg[2] == E.DeadlineExceededError.code


def test_app_without_model_answers_default(frontend, wire_conn):
    from clipper.management.registry import Application

    frontend.call(frontend.fe.register_application(Application("lonely", "float32", (4,), default_output="none")))
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "lonely", np.zeros(4, np.float32)))
    msg = c.recv(1)[0]
    assert msg[3] == "none" and msg[4] is True and "no linked model" in msg[5]["explanation"]
