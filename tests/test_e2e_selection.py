"""The selection layer end to end: real frontends, real container processes, real sockets.

Ensembles, straggler mitigation, defaults, confidence, feedback and per-user
policy states (including across a restart of the frontend).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipper import errors as E
from clipper.client import Client

X = np.array([3, 0, 0, 0], np.float32)


def const(n, **env):
    return {"CLIPPER_TEST_CONST": str(n), **{k: str(v) for k, v in env.items()}}


def test_exp4_ensemble_votes_and_reports_confidence_and_models(frontend):
    keys = frontend.deploy_ensemble("vote", [("m1", "constant", const(1)), ("m2", "constant", const(1)),
                                             ("m3", "constant", const(2))], output_kind="label")
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("vote", X)
    assert p.output == 1 and not p.is_default
    assert p.confidence == pytest.approx(2 / 3) and list(p.models) == keys and p.missing == ()
    assert not p.low_confidence


def test_straggler_is_left_out_at_the_deadline_and_fills_the_cache_later(frontend, tmp_path):
    # The slow model answers only once the test opens its gate: the answer at the 300 ms deadline
    # cannot have waited for it, however loaded the machine (no clock is read).
    gate = tmp_path / "gate"
    keys = frontend.deploy_ensemble(
        "strag", [("fast1", "constant", const(4)), ("fast2", "constant", const(4)),
                  ("slow", "constant", const(9, CLIPPER_TEST_GATE=gate))], slo_ms=300, output_kind="label")
    with Client("127.0.0.1", frontend.port, timeout=15) as c:
        p = c.predict("strag", X)
    assert p.output == 4 and not p.is_default and p.confidence == 1.0
    assert list(p.models) == keys[:2]
    assert len(p.missing) == 1 and p.missing[0].startswith("slow:1 (no answer in time")
    st = frontend.stats()["applications"]["strag"]
    assert st["partial"] == 1 and st["answered"] == 1
    # The slow model's late answer still lands in the cache: once it has, all three answer at once.
    gate.touch()
    frontend.wait_until(lambda s: s["cache"]["entries"] >= 3 and s["models"]["slow:1"]["queries_sent"] == 1,
                        what="the late answer to be cached")
    frontend.wait_until(lambda s: s["cache"]["pending"] == 0, what="no computation pending")
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("strag", X)
    assert list(p.models) == keys and p.missing == () and p.output == 4
    assert p.confidence == pytest.approx(2 / 3)


def test_default_output_when_every_model_is_too_slow(frontend):
    frontend.deploy_ensemble("allslow", [("s1", "constant", const(1, CLIPPER_TEST_SLEEP_S=3)),
                                         ("s2", "constant", const(2, CLIPPER_TEST_SLEEP_S=3))],
                             slo_ms=200, default_output=-1, cache=False)
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("allslow", X)
    assert p.is_default and p.output == -1 and p.confidence == 0.0 and p.models == ()
    assert "no selected model answered within the SLO" in p.explanation
    assert "s1:1 (no answer in time)" in p.explanation and "s2:1 (no answer in time)" in p.explanation
    assert len(p.missing) == 2


def test_deadline_error_when_every_model_fails_and_the_app_wants_errors(frontend):
    frontend.deploy_ensemble("allfail", [("f1", "raise_on_negative", None), ("f2", "raise_on_negative", None)],
                             on_deadline="error", output_kind="number")
    with Client("127.0.0.1", frontend.port) as c:
        with pytest.raises(E.ModelError, match="no selected model could answer"):
            c.predict("allfail", np.array([-1, 0, 0, 0], np.float32))
        p = c.predict("allfail", np.array([2, 0, 0, 0], np.float32))
        assert p.output == 2.0 and p.confidence == 1.0


def test_one_failing_model_leaves_the_others_answer(frontend):
    keys = frontend.deploy_ensemble("onefail", [("ok", "first_as_label", None), ("bad", "raise_on_negative", None)],
                                    output_kind="label")
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("onefail", np.array([-5, 0, 0, 0], np.float32))
    assert p.output == -5 and list(p.models) == [keys[0]]
    assert len(p.missing) == 1 and "MODEL_ERROR" in p.missing[0] and "negative pixel" in p.missing[0]


def test_low_confidence_gets_the_default_output_when_asked(frontend):
    frontend.deploy_ensemble("unsure", [("a", "constant", const(1)), ("b", "constant", const(2))],
                             output_kind="label", confidence_threshold=0.75, on_low_confidence="default",
                             default_output="unsure")
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("unsure", X)
    assert p.is_default and p.output == "unsure" and p.low_confidence
    assert p.confidence == 0.5 and p.extra["combined_output"] == 1
    assert "below the application's confidence_threshold 0.75" in p.explanation
    assert frontend.stats()["applications"]["unsure"]["low_confidence"] == 1


def test_low_confidence_is_flagged_by_default(frontend):
    frontend.deploy_ensemble("flag", [("a", "constant", const(1)), ("b", "constant", const(2))],
                             output_kind="label", confidence_threshold=0.75)
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("flag", X)
    assert not p.is_default and p.output == 1 and p.low_confidence and p.confidence == 0.5


def test_probability_outputs_are_averaged(frontend):
    frontend.deploy_ensemble("probs", [("p1", "fixed_probabilities", {"CLIPPER_TEST_PROBS": "0.6,0.4"}),
                                       ("p2", "fixed_probabilities", {"CLIPPER_TEST_PROBS": "0.2,0.8"})],
                             policy="exp4", output_kind="probabilities")
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("probs", X)
    assert np.allclose(p.output, [0.4, 0.6]) and p.confidence == 0.5


def test_exp4_learns_from_probability_outputs_end_to_end(frontend):
    """Feedback on probability vectors: each model's loss is 1 - p(label), so with label 0 the [0.9, 0.1]
    model loses 0.1 and the [0.2, 0.8] one 0.8; eta 0.2 moves their log-weights apart by 0.14, and the
    next answer averages the vectors with those weights. Caught mutation: the probability loss taken as
    p(label) (the weights move the other way)."""
    keys = frontend.deploy_ensemble("pl", [("sure", "fixed_probabilities", {"CLIPPER_TEST_PROBS": "0.9,0.1"}),
                                           ("doubt", "fixed_probabilities", {"CLIPPER_TEST_PROBS": "0.2,0.8"})],
                                    output_kind="probabilities", policy_options={"eta": 0.2})
    with Client("127.0.0.1", frontend.port) as c:
        assert c.feedback("pl", X, 0)["models"] == keys
        assert frontend.state("pl") == {"logw": {"sure": 0.0, "doubt": pytest.approx(-0.2 * 0.8 + 0.2 * 0.1)},
                                        "updates": 1}
        p = c.predict("pl", np.array([8, 0, 0, 0], np.float32))
    w = math.exp(-0.14)
    assert np.allclose(p.output, [(0.9 + 0.2 * w) / (1 + w), (0.1 + 0.8 * w) / (1 + w)])
    assert list(p.models) == keys and p.confidence == pytest.approx(1 / (1 + w))  # only "sure" backs class 0


def test_exp4_learns_from_number_outputs_end_to_end(frontend):
    """Feedback on numbers: the loss is |output - label| / loss_scale, clipped to 1. With label 2 for
    x[0] = 1, "double" (2 x[0]) loses 0 and "quint" (5 x[0]) loses 3 / 4; eta 0.5 puts quint's log-weight
    at -0.375, and the next answer is the mean weighted by that. Caught mutations: loss_scale ignored
    (quint loses 1: -0.5); the mean left unweighted (3.5)."""
    keys = frontend.deploy_ensemble("nl", [("double", "Scaled", {"CLIPPER_TEST_FACTOR": "2"}),
                                           ("quint", "Scaled", {"CLIPPER_TEST_FACTOR": "5"})],
                                    output_kind="number", policy_options={"eta": 0.5, "loss_scale": 4.0})
    one = np.array([1, 0, 0, 0], np.float32)
    with Client("127.0.0.1", frontend.port) as c:
        assert c.feedback("nl", one, 2.0)["models"] == keys
        assert frontend.state("nl") == {"logw": {"double": 0.0, "quint": pytest.approx(-0.375)}, "updates": 1}
        p = c.predict("nl", np.array([2, 0, 0, 0], np.float32))
    w = math.exp(-0.375)
    assert p.output == pytest.approx((4.0 + 10.0 * w) / (1 + w)) and list(p.models) == keys


def test_feedback_updates_the_policy_state_from_cached_predictions(frontend):
    keys = frontend.deploy_ensemble("learn", [("right", "first_as_label", None), ("wrong", "constant", const(0))],
                                    output_kind="label", policy_options={"eta": 0.2})
    xs = [np.array([i, 0, 0, 0], np.float32) for i in range(1, 6)]
    with Client("127.0.0.1", frontend.port) as c:
        for x in xs:
            c.predict("learn", x)
        sent = frontend.stats()["models"]["right:1"]["queries_sent"]
        for x in xs:
            info = c.feedback("learn", x, int(x[0]))
            assert info["models"] == keys
        # Every prediction feedback needed was in the cache: no model computed anything again.
        assert frontend.stats()["models"]["right:1"]["queries_sent"] == sent
        state = frontend.state("learn")
        assert state["logw"] == pytest.approx({"right": 0.0, "wrong": -5 * 0.2}) and state["updates"] == 5
        # a fresh input: feedback asks the models
        info = c.feedback("learn", np.array([7, 0, 0, 0], np.float32), 7)
        assert info["models"] == keys
        assert frontend.stats()["models"]["right:1"]["queries_sent"] == sent + 1
        # and the weights now decide a disagreement: "right" wins despite equal votes
        p = c.predict("learn", np.array([9, 0, 0, 0], np.float32))
        assert p.output == 9 and p.confidence == pytest.approx(1 / (1 + math.exp(-1.2)))


def test_per_user_states_are_independent(frontend):
    frontend.deploy_ensemble("users", [("right", "first_as_label", None), ("wrong", "constant", const(0))],
                             output_kind="label")
    with Client("127.0.0.1", frontend.port) as c:
        for i in range(1, 4):
            c.feedback("users", np.array([i, 0, 0, 0], np.float32), i, user="alice")
        c.feedback("users", np.array([5, 0, 0, 0], np.float32), 0, user="bob")  # bob says "wrong" is right
        with pytest.raises(E.InvalidInputError, match="options.user"):
            c.feedback("users", X, 3, options={"user": 7})
        with pytest.raises(E.LimitExceededError, match="max_user_id_len"):
            c.predict("users", X, user="x" * 300)
    alice, bob, shared = frontend.state("users", "alice"), frontend.state("users", "bob"), frontend.state("users")
    assert alice["logw"]["wrong"] == pytest.approx(-0.6) and alice["logw"]["right"] == 0.0
    assert bob["logw"]["right"] == pytest.approx(-0.2) and bob["logw"]["wrong"] == 0.0
    assert shared == {"logw": {"right": 0.0, "wrong": 0.0}, "updates": 0}


def test_policy_state_survives_a_frontend_restart(frontend_factory, tmp_path):
    path = str(tmp_path / "state.sqlite")
    models = [("right", "first_as_label", None), ("wrong", "constant", const(0))]
    first = frontend_factory(state_path=path)
    first.deploy_ensemble("durable", models, output_kind="label")
    with Client("127.0.0.1", first.port) as c:
        for i in range(1, 5):
            c.feedback("durable", np.array([i, 0, 0, 0], np.float32), i, user="carol")
    before = first.state("durable", "carol")
    assert before["updates"] == 4
    first.close()  # saves what is not saved yet
    second = frontend_factory(state_path=path)  # brings back the registry (and starts the containers) too
    for model, _, _ in models:
        second.call(second.fe.wait_ready(model, "1", timeout_s=60))
    assert second.state("durable", "carol") == before
    assert second.state("durable", "dave")["updates"] == 0


def test_exp3_asks_one_model_per_query_and_learns(frontend):
    keys = frontend.deploy_ensemble("bandit", [("right", "first_as_label", None), ("wrong", "constant", const(0))],
                                    policy="exp3", output_kind="label", cache=False,
                                    policy_options={"eta": 0.5, "seed": 7})
    with Client("127.0.0.1", frontend.port) as c:
        used = [c.predict("bandit", np.array([i, 0, 0, 0], np.float32)).models for i in range(1, 41)]
        assert all(len(m) == 1 for m in used) and {m[0] for m in used} == set(keys)
        for i in range(1, 61):
            c.feedback("bandit", np.array([i, 0, 0, 0], np.float32), i)
        p = frontend.state("bandit")
        assert p["logw"]["wrong"] < math.log(0.05) and p["logw"]["right"] == 0.0
        late = [c.predict("bandit", np.array([i, 0, 0, 0], np.float32)).models[0] for i in range(100, 140)]
    assert late.count("right:1") >= 36


def test_linking_two_versions_of_one_model(frontend):
    from clipper.management.registry import Application, ModelVersion

    fe = frontend.fe
    frontend.call(fe.register_application(Application("ab", "float32", [4], policy="exp4", output_kind="number")))
    for v, factor in (("1", "2"), ("2", "5")):
        frontend.call(fe.deploy_model(ModelVersion("scaled", v, "float32", [4], entry="model_zoo.py:Scaled",
                                                   env={"CLIPPER_TEST_FACTOR": factor})))
    assert frontend.call(fe.link("ab", "scaled", "1")) == "scaled:1"
    assert frontend.call(fe.link("ab", "scaled:2")) == "scaled:2"
    for v in ("1", "2"):
        frontend.call(fe.wait_ready("scaled", v, timeout_s=60))
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("ab", np.array([1, 0, 0, 0], np.float32))
    assert p.output == pytest.approx(3.5) and list(p.models) == ["scaled:1", "scaled:2"]


def test_a_query_whose_application_loses_its_links_still_gets_an_answer(frontend, wire_conn, tmp_path):
    # "late" answers only once its gate opens: the query still waits for it when both links go, and is
    # answered at its deadline. The SLO (2.5 s) only has to outlast two unlinks on the loop; that it did
    # is checked, not assumed.
    from clipper.protocol import wire

    gate = tmp_path / "gate"
    frontend.deploy_ensemble("orphaned", [("quick", "constant", const(1)),
                                          ("late", "constant", const(2, CLIPPER_TEST_GATE=gate))],
                             slo_ms=2500, output_kind="label", cache=False, on_deadline="error")
    c = wire_conn(frontend.port)
    c.send(wire.predict(1, "orphaned", X))
    frontend.wait_until(lambda s: s["models"]["late:1"]["queries_sent"] >= 1, what="both models asked")
    frontend.call(frontend.fe.unlink("orphaned", "quick"))
    frontend.call(frontend.fe.unlink("orphaned", "late"))
    st = frontend.stats()["applications"]["orphaned"]
    assert st["answered"] == st["errors"] == st["defaults"] == 0, f"answered before the unlinks: {st}"
    (msg,) = c.recv(1, timeout=15)
    gate.touch()
    assert msg[0] == wire.ERROR and msg[1] == 1 and msg[2] == E.NoModelAvailableError.code
