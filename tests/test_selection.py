"""The selection layer in isolation: policies' update rules against hand-computed
values, combining each output kind, losses, the state store and state tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipper.errors import InvalidConfigError, InvalidInputError
from clipper.management.registry import Application
from clipper.selection import MISSING, Exp3, Exp4, Policy, SingleModel, UCB1, combine, make_policy, register_policy
from clipper.selection.combine import detect_kind
from clipper.selection.losses import make_loss
from clipper.store import SQLiteStore, StateTable
from conftest import check_store_against_model
from clipper.store.states import decode_state, encode_state


# ------------------------------------------------------------------ combine
def test_vote_weighted_majority_and_share():
    out, conf = combine("label", [3, 5, 3, 7], [1.0, 2.5, 1.0, 0.5])
    assert out == 5 and conf == pytest.approx(2.5 / 5.0)
    out, conf = combine("label", [3, 5, 3], [1.0, 1.0, 1.0])
    assert out == 3 and conf == pytest.approx(2 / 3)


def test_vote_tie_goes_to_first_in_link_order_and_numpy_scalars_count_as_python():
    out, conf = combine("label", [np.int64(2), 1], [1.0, 1.0])
    assert out == 2 and type(out) is int and conf == 0.5
    out, _ = combine("label", ["cat", "dog", np.str_("dog")], None)
    assert out == "dog"


def test_weighted_mean_of_numbers_and_agreement():
    out, conf = combine("number", [1.0, 2.0, 4.0], [1.0, 1.0, 2.0])
    assert out == pytest.approx((1 + 2 + 8) / 4)
    assert conf == 0.0  # nobody is within the default tolerance of 2.75
    out, conf = combine("number", [2.0, 2.0, 9.0], [1.0, 1.0, 0.0], tolerance=1e-9)
    assert out == 2.0 and conf == 1.0  # the zero-weight outlier neither moves nor votes


def test_mean_vector():
    out, conf = combine("vector", [[1.0, 2.0], [3.0, 6.0]], [3.0, 1.0], tolerance=0.1)
    assert np.allclose(out, [1.5, 3.0]) and conf == 0.0
    out, conf = combine("vector", [np.array([1.0, 1.0]), np.array([1.0, 1.05])], None, tolerance=0.1)
    assert conf == 1.0


def test_probabilities_are_averaged_and_confidence_is_argmax_agreement():
    a, b, c = [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]
    out, conf = combine("probabilities", [a, b, c], [1.0, 1.0, 2.0])
    assert np.allclose(out, (np.array(a) + b + 2 * np.array(c)) / 4) and out.sum() == pytest.approx(1)
    assert int(np.argmax(out)) == 2 and conf == pytest.approx(0.5)


def test_auto_detects_kinds():
    assert detect_kind(3) == "label" and detect_kind("x") == "label" and detect_kind(True) == "label"
    assert detect_kind(0.5) == "number" and detect_kind(np.float32(1)) == "number"
    assert detect_kind([0.25, 0.75]) == "probabilities" and detect_kind(np.array([0.2, 0.3])) == "vector"
    out, conf = combine("auto", [[0.9, 0.1], [0.2, 0.8], [0.8, 0.2]])
    assert np.allclose(out, [1.9 / 3, 1.1 / 3]) and conf == pytest.approx(2 / 3)


def test_single_answer_passes_through_and_nothing_is_an_error():
    assert combine("number", [4.5]) == (4.5, 1.0)
    with pytest.raises(InvalidInputError):
        combine("label", [])
    with pytest.raises(InvalidInputError):
        combine("vector", [[1.0, 2.0], [1.0]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0.01, 10)), min_size=1, max_size=12))
def test_vote_matches_a_reference_count(pairs):
    labels = [p[0] for p in pairs]
    weights = [p[1] for p in pairs]
    out, conf = combine("label", labels, weights)
    totals = {}
    for lab, w in pairs:
        totals[lab] = totals.get(lab, 0.0) + w
    best = max(totals.values())
    assert math.isclose(totals[out], best, rel_tol=1e-12)
    assert labels.index(out) == min(labels.index(k) for k, v in totals.items() if math.isclose(v, best, rel_tol=1e-12))
    assert 0 < conf <= 1 and conf == pytest.approx(best / sum(weights))


# ------------------------------------------------------------------ losses
def test_losses():
    zero_one = make_loss(None, "label")
    assert zero_one(3, 3) == 0.0 and zero_one(3, 4) == 1.0 and zero_one(np.int64(3), 3) == 0.0
    prob = make_loss(None, "probabilities")
    assert prob([0.2, 0.8], 1) == pytest.approx(0.2) and prob([0.2, 0.8], 0) == pytest.approx(0.8)
    assert make_loss("zero_one", "probabilities")([0.2, 0.8], 1) == 0.0
    absolute = make_loss(None, "number", scale=4.0)
    assert absolute(3.0, 1.0) == pytest.approx(0.5) and absolute(30.0, 1.0) == 1.0
    assert make_loss(None, "vector")([1.0, 3.0], [1.5, 2.5]) == pytest.approx(0.5)
    auto = make_loss(None, "auto")
    assert auto(2, 3) == 1.0 and auto([0.9, 0.1], 0) == pytest.approx(0.1)
    with pytest.raises(InvalidInputError):
        prob([0.5, 0.5], 7)
    with pytest.raises(InvalidConfigError):
        make_loss("squared", "number")


# ------------------------------------------------------------------ policies
def test_single_model_policy():
    p = make_policy("single", ["a", "b"])
    assert isinstance(p, SingleModel) and not p.learns
    s = p.init()
    assert p.select(s, None) == ["a"] and p.feedback_models(s, None) == []
    assert p.combine(s, None, {"b": 7}) == (7, 1.0)
    assert p.observe(s, None, 1, {"a": 2}) is s


def test_exp3_update_rule_by_hand():
    p = make_policy("exp3", ["a", "b", "c"], output_kind="label", options={"eta": 0.05, "seed": 3})
    assert isinstance(p, Exp3)
    s = p.init()
    assert p.probabilities(s) == pytest.approx([1 / 3] * 3)
    # a was drawn and was wrong: log w_a -= 0.05 * 1 / (1/3) = 0.15
    s = p.observe(s, None, 1, {"a": 0})
    assert s["logw"] == pytest.approx({"a": -0.15, "b": 0.0, "c": 0.0})
    w = [math.exp(-0.15), 1.0, 1.0]
    assert p.probabilities(s) == pytest.approx([x / sum(w) for x in w])
    # b drawn, right: nothing changes; c drawn, missing (no answer): the missing loss 1 at p_c
    s2 = p.observe(s, None, 1, {"b": 1})
    assert s2["logw"] == pytest.approx(s["logw"])
    p_c = w[2] / sum(w)
    s3 = p.observe(s2, None, 1, {"c": MISSING})
    # normalized to the largest (b, 0.0)
    assert s3["logw"] == pytest.approx({"a": -0.15, "b": 0.0, "c": -0.05 / p_c})
    assert s3["updates"] == 3


def test_exp3_update_with_exploration_uses_the_mixed_probability():
    """gamma > 0: the importance weight is the probability the model was drawn with, (1 - gamma) w_i / sum(w)
    + gamma / K, not w_i / sum(w). Caught mutation: ``p = w / sum(w)`` in observe (b's step would be
    0.1 / 0.25 = 0.4, not 0.1 / 0.35)."""
    p = make_policy("exp3", ["a", "b"], output_kind="label", options={"eta": 0.1, "gamma": 0.4})
    s = {"logw": {"a": 0.0, "b": math.log(1 / 3)}, "updates": 4}  # w = 3:1, so w / sum(w) = 0.75 / 0.25
    assert p.probabilities(s) == pytest.approx([0.65, 0.35])  # 0.6 * 0.75 + 0.2, 0.6 * 0.25 + 0.2
    # b was drawn and was wrong: log w_b -= 0.1 * 1 / 0.35
    s2 = p.observe(s, None, 1, {"b": 0})
    assert s2 == {"logw": {"a": 0.0, "b": pytest.approx(math.log(1 / 3) - 0.1 / 0.35)}, "updates": 5}
    # a was drawn and was wrong: a falls by 0.1 / 0.65 and stays the largest, so the new zero (b: -0.944766)
    s3 = p.observe(s, None, 1, {"a": 0})
    assert s3["logw"] == pytest.approx({"a": 0.0, "b": math.log(1 / 3) + 0.1 / 0.65})
    assert s3["logw"]["b"] == pytest.approx(-0.944766, abs=1e-6)


def test_exp3_draws_follow_the_probabilities():
    p = make_policy("exp3", ["a", "b"], options={"seed": 11})
    s = {"logw": {"a": 0.0, "b": math.log(1 / 3)}, "updates": 0}  # p = 0.75 / 0.25
    picks = [p.select(s, None)[0] for _ in range(4000)]
    assert 0.72 < picks.count("a") / 4000 < 0.78
    g = make_policy("exp3", ["a", "b"], options={"gamma": 0.4})
    assert g.probabilities(s) == pytest.approx([0.6 * 0.75 + 0.2, 0.6 * 0.25 + 0.2])


def test_exp3_weight_floor_lets_a_model_come_back():
    p = make_policy("exp3", ["a", "b"], options={"min_weight": 0.01})
    s = p.init()
    for _ in range(200):
        s = p.observe(s, None, 1, {"a": 0})
    assert s["logw"]["a"] == pytest.approx(math.log(0.01)) and s["logw"]["b"] == 0.0


def test_exp4_update_rule_and_weighted_combine_by_hand():
    p = make_policy("exp4", ["a", "b", "c"], output_kind="label", options={"eta": 0.2})
    assert isinstance(p, Exp4)
    s = p.init()
    assert p.select(s, None) == ["a", "b", "c"]
    s = p.observe(s, None, 1, {"a": 1, "b": 0, "c": MISSING})
    assert s["logw"] == pytest.approx({"a": 0.0, "b": -0.2, "c": -0.2})
    s = p.observe(s, None, 2, {"a": 1, "b": 2, "c": 2})
    assert s["logw"] == pytest.approx({"a": 0.0, "b": 0.0, "c": 0.0})  # all at -0.2, renormalized to the top
    s = {"logw": {"a": 0.0, "b": math.log(0.5), "c": math.log(0.25)}, "updates": 5}
    out, conf = p.combine(s, None, {"a": 9, "b": 4, "c": 4})
    assert out == 9 and conf == pytest.approx(1 / 1.75)
    out, conf = p.combine(s, None, {"b": 4, "c": 5})  # a straggled: the others decide
    assert out == 4 and conf == pytest.approx(0.5 / 0.75)


def test_exp4_numbers_weighted_mean():
    p = make_policy("exp4", ["a", "b"], output_kind="number", options={"tolerance": 0.5})
    s = {"logw": {"a": 0.0, "b": math.log(1 / 3)}, "updates": 1}
    out, conf = p.combine(s, None, {"a": 1.0, "b": 5.0})
    # tolerance 0.5 is relative to the mean (2.0) once it exceeds 1: a (off by 1) agrees, b does not
    assert out == pytest.approx((1.0 * 1 + 5.0 / 3) / (4 / 3)) and conf == pytest.approx(0.75)


def test_new_model_starts_at_the_mean_log_weight():
    p = make_policy("exp4", ["a", "b", "new"])
    s = {"logw": {"a": 0.0, "b": -1.0}, "updates": 3}
    assert p.log_weights(s) == pytest.approx([0.0, -1.0, -0.5])


def test_ucb1_by_hand():
    p = make_policy("ucb1", ["a", "b"], output_kind="label")
    assert isinstance(p, UCB1)
    s = p.init()
    assert p.select(s, None) == ["a"]  # untried first, in link order
    s = p.observe(s, None, 1, {"a": 1})
    assert p.select(s, None) == ["b"]
    s = p.observe(s, None, 1, {"b": 0})
    # a: 1 + sqrt(2 ln 2 / 1) ; b: 0 + sqrt(2 ln 2)
    assert p.scores(s) == pytest.approx([1 + math.sqrt(2 * math.log(2)), math.sqrt(2 * math.log(2))])
    assert p.feedback_models(s, None) == ["a"]
    d = make_policy("ucb1", ["a", "b"], options={"discount": 0.5})
    s = d.observe({"n": {"a": 4.0, "b": 2.0}, "reward": {"a": 2.0, "b": 2.0}}, None, 1, {"a": 1})
    assert s == {"n": {"a": 3.0, "b": 1.0}, "reward": {"a": 2.0, "b": 1.0}}


def test_bad_policy_configuration_is_rejected_with_the_value():
    with pytest.raises(InvalidConfigError, match="eta"):
        make_policy("exp4", ["a"], options={"eta": -1})
    with pytest.raises(InvalidConfigError, match="unknown option"):
        make_policy("exp3", ["a"], options={"learning_rate": 0.1})
    with pytest.raises(InvalidConfigError, match="not one of"):
        make_policy("thompson", ["a"])
    with pytest.raises(InvalidConfigError, match="cannot be imported"):
        make_policy("no.such.module:Policy", ["a"])
    with pytest.raises(InvalidConfigError, match="policy option eta"):
        Application("x", "float32", [2], policy="exp3", policy_options={"eta": "fast"})
    with pytest.raises(InvalidConfigError, match="confidence_threshold"):
        Application("x", "float32", [2], confidence_threshold=1.5)


@register_policy("test-last")
class LastModel(Policy):
    learns = False

    def init(self):
        return {}

    def select(self, state, x):
        return [self.models[-1]]

    def combine(self, state, x, predictions):
        return predictions[self.models[-1]], 0.25

    def observe(self, state, x, label, predictions):
        return state


def test_user_policies_register_by_name_and_by_path():
    assert isinstance(make_policy("test-last", ["a", "b"]), LastModel)
    p = make_policy("tests.test_selection:LastModel", ["a", "b"])
    assert p.select({}, None) == ["b"]
    app = Application("mine", "float32", [2], policy="test-last")
    assert app.policy == "test-last"


# ------------------------------------------------------------------ the store
def test_sqlite_store_roundtrip_recency_and_trim(tmp_path):
    path = tmp_path / "s.sqlite"
    store = SQLiteStore(path)
    store.save_many([("ns", f"u{i}", bytes([i])) for i in range(10)])
    store.save_many([("ns", "u3", b"new"), ("other", "u3", b"o")])
    assert store.load("ns", "u3") == b"new" and store.load("ns", "zz") is None
    assert store.count("ns") == 10 and store.keys("ns", 2) == ["u3", "u9"]
    assert store.trim("ns", 4) == 6
    assert sorted(store.keys("ns")) == ["u3", "u7", "u8", "u9"]
    store.close()
    again = SQLiteStore(path)  # the recency counter survives a restart
    again.save_many([("ns", "late", b"x")])
    assert again.keys("ns", 1) == ["late"] and again.load("other", "u3") == b"o"
    assert again.delete_namespace("ns") == 5 and again.count("ns") == 0
    again.close()


def test_state_encoding_roundtrip_and_garbage():
    raw = encode_state("exp4", {"logw": {"a": -0.5}, "updates": 2})
    assert decode_state(raw) == ("exp4", {"logw": {"a": -0.5}, "updates": 2})
    assert decode_state(b"\xc1garbage") == (None, None)


def test_state_table_lru_write_behind_and_bounds(tmp_path):
    store = SQLiteStore(tmp_path / "t.sqlite")
    dirty_calls = []
    p = make_policy("exp4", ["a", "b"])
    t = StateTable(store, "app", "exp4", p.init, max_in_memory=3, max_states=20, on_dirty=lambda: dirty_calls.append(1))
    for i in range(6):
        t.put(f"u{i}", {"logw": {"a": -float(i), "b": 0.0}, "updates": i})
    assert len(t.lru) == 3 and len(t.dirty) == 6 and len(dirty_calls) == 1  # one flush is asked for
    assert t.get("u0")["updates"] == 0  # evicted from memory, still unsaved: found in dirty
    store.save_many(t.take_dirty()[0])
    assert not t.dirty and store.count("policy/app") == 6
    t2 = StateTable(store, "app", "exp4", p.init, max_in_memory=3, max_states=20)
    assert t2.get("u4") == {"logw": {"a": -4.0, "b": 0.0}, "updates": 4} and t2.loads == 1
    assert t2.get("nobody") == p.init() and t2.fresh == 1
    # a state of another policy is not taken for this one's
    t3 = StateTable(store, "app", "ucb1", lambda: {"n": {}}, max_in_memory=3, max_states=20)
    assert t3.get("u4") == {"n": {}}
    # bounded: the store keeps max_states per application, least recently saved go first
    for i in range(40):
        t.put(f"v{i}", {"logw": {}, "updates": i})
        store.save_many(t.take_dirty()[0])
        t.trim_if_due()
    assert store.count("policy/app") <= 20 + 16 and "v39" in store.keys("policy/app", 1)
    t.drop()
    assert store.count("policy/app") == 0
    store.close()


ops = st.lists(st.one_of(
    st.tuples(st.just("save"), st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from("uvwxyz"),
                                                  st.binary(max_size=8)), max_size=4)),
    st.tuples(st.just("trim"), st.sampled_from(["a", "b"]), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.sampled_from(["a", "b"]), st.sampled_from("uvwxyz")),
    st.tuples(st.just("drop"), st.sampled_from(["a", "b"])),
), max_size=30)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "writer-thread"])
@settings(max_examples=150, deadline=None)
@given(seq=ops)
def test_sqlite_store_matches_a_reference_model(seq, background, tmp_path_factory):
    # the writer thread commits behind the caller's back: every read must still see the last write
    path = ":memory:" if not background else str(tmp_path_factory.mktemp("store") / "s.sqlite")
    store = SQLiteStore(path, background=background)
    check_store_against_model(store, seq, ("a", "b"), reports_deletes=True)
    store.close()


def test_answers_are_planned_a_margin_before_the_slo():
    import uvloop

    from clipper.query.processor import AppRoute, QueryProcessor

    loop = uvloop.new_event_loop()
    try:
        proc = QueryProcessor(loop, 1024, 0, deadline_margin_ms=2.0)
        assert AppRoute(Application("a", "float32", [2], slo_ms=20), proc).answer_ns == 18_000_000
        assert AppRoute(Application("b", "float32", [2], slo_ms=5), proc).answer_ns == 4_500_000  # a tenth at most
        none = QueryProcessor(loop, 1024, 0, deadline_margin_ms=0.0)
        assert AppRoute(Application("c", "float32", [2], slo_ms=20), none).answer_ns == 20_000_000
    finally:
        loop.close()


def test_late_answers_move_the_planned_answer_earlier_within_a_quarter_of_the_slo():
    import uvloop

    from clipper.query.processor import AppRoute, QueryProcessor

    loop = uvloop.new_event_loop()
    try:
        route = AppRoute(Application("a", "float32", [2], slo_ms=20), QueryProcessor(loop, 1024, 0))
        for _ in range(32):
            route._note_lateness(-300_000)  # early answers count as on time
        assert route.answer_ns == 18_000_000
        for _ in range(320):
            route._note_lateness(1_000_000)  # a loaded machine: answers leave 1 ms late
        # margin = 2 ms configured + twice the smoothed 1 ms lateness
        assert abs(route.answer_ns - 16_000_000) < 50_000
        for _ in range(3200):
            route._note_lateness(50_000_000)
        assert route.answer_ns == 15_000_000  # never more than a quarter of the SLO early
        fixed = AppRoute(Application("b", "float32", [2], slo_ms=20),
                         QueryProcessor(loop, 1024, 0, adaptive_margin=False))
        for _ in range(320):
            fixed._note_lateness(5_000_000)
        assert fixed.answer_ns == 18_000_000
    finally:
        loop.close()
