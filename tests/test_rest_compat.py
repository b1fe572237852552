"""The REST port against the original Clipper's documented formats (real frontend, real containers, real
HTTP): error bodies with ``cause``, the per-query ``version``, JSON-string outputs, a one-item batch,
``GET /metrics`` and ``GET /<app>``."""

from __future__ import annotations

import json

import pytest

from clipper.management.registry import Application, ModelVersion
from test_rest import Http


def _register(fe, name, fn, *, rest_format="original", dtype="float64", shape=(-1,), default_output=None,
              model=None, versions=("1",)):
    model = model or f"{name}-model"
    fe.call(fe.fe.register_application(Application(name, dtype, shape, slo_ms=10_000.0,
                                                   default_output=default_output, rest_format=rest_format)))
    for v in versions:
        fe.call(fe.fe.deploy_model(ModelVersion(model, v, dtype, shape, entry=f"model_zoo.py:{fn}", max_batch=8)))
    fe.call(fe.fe.link(name, model))
    for v in versions:
        fe.call(fe.fe.wait_ready(model, v, timeout_s=60))


@pytest.fixture
def http(frontend):
    h = Http(frontend.fe.rest_port)
    yield h
    h.close()


def test_every_error_carries_cause_and_keeps_its_code(frontend, http):
    """Catches: an error body without the original's "cause" key, or one that lost the machine-readable
    code (the Clipper format keeps {"error": {"code", ...}}; the original format "error" is a name)."""
    frontend.deploy("mine", "row_sum")
    _register(frontend, "orig", "vec_sum")
    status, body = http.post("/nope/predict", {"input": [1.0]})
    assert status == 404 and body["error"]["code"] == 202 and "nope" in body["cause"]
    status, body = http.post("/mine/predict", {"input": [1.0, 2.0]})
    assert status == 400 and body["error"]["name"] == "SHAPE_MISMATCH" and body["cause"] == body["error"]["message"]
    status, body = http.post("/orig/predict", {"input": ["a", "b"]})
    assert status == 400 and body["error"] == "DTYPE_MISMATCH" and body["code"] == 203 and "str" in body["cause"]
    status, body = http.post("/orig/predict", {"nothing": 1})
    assert status == 400 and isinstance(body["cause"], str) and body["code"] == 201


def test_the_query_version_picks_a_model_version_and_an_unknown_one_is_400(frontend, http):
    """Catches: the per-query "version" ignored (answered by the current version) or an unknown version
    answered instead of refused with 400."""
    frontend.call(frontend.fe.register_application(Application("ver", "float32", (4,), slo_ms=10_000.0)))
    frontend.call(frontend.fe.deploy_model(ModelVersion("m", "1", "float32", (4,), entry="model_zoo.py:row_sum")))
    frontend.call(frontend.fe.deploy_model(ModelVersion("m", "2", "float32", (4,), entry="model_zoo.py:Scaled",
                                                        env={"CLIPPER_TEST_FACTOR": "3"})))
    frontend.call(frontend.fe.link("ver", "m"))
    for v in ("1", "2"):
        frontend.call(frontend.fe.wait_ready("m", v, timeout_s=60))
    frontend.call(frontend.fe.set_model_version("m", "2"))
    x = [1.0, 2.0, 3.0, 4.0]
    status, now = http.post("/ver/predict", {"input": x})
    assert status == 200 and now["models"] == ["m:2"]
    status, old = http.post("/ver/predict", {"input": x, "version": "1"})
    assert status == 200 and old["output"] == 10.0 and old["models"] == ["m:1"] and now["output"] == 3.0
    status, old = http.post("/ver/predict", {"input": x, "version": 1})  # a number, as JSON clients send it
    assert status == 200 and old["models"] == ["m:1"]
    status, body = http.post("/ver/predict", {"input": x, "version": "7"})
    assert status == 400 and body["error"]["name"] == "UNKNOWN_MODEL" and "7" in body["cause"]


def test_json_text_outputs_are_parsed_for_original_applications_only(frontend, http):
    """Catches: a model's json.dumps({...}) output answered as a str to an original-format application
    (or parsed for a Clipper-format one, which gets exactly what the model returned); a default output
    that is not JSON mangled."""
    _register(frontend, "orig", "as_json_text", default_output="None")
    _register(frontend, "mine", "as_json_text", rest_format="clipper", model="mine-model")
    status, body = http.post("/orig/predict", {"input": [1.0, 2.0, 3.0]})
    assert status == 200 and body["output"] == {"n": 3, "ok": True} and body["default"] is False
    status, body = http.post("/mine/predict", {"input": [1.0, 2.0, 3.0]})
    assert status == 200 and json.loads(body["output"]) == {"n": 3, "ok": True}
    frontend.call(frontend.fe.unlink("orig", "orig-model"))
    status, body = http.post("/orig/predict", {"input": [1.0]})
    assert status == 200 and body["default"] is True and body["output"] == "None"


def test_a_one_item_batch_is_answered_as_the_original_does(frontend, http):
    """Catches: a one-item input_batch of an original-format application wrapped in batch_predictions (the
    original answers the object itself), or the Clipper format's always-a-list answer broken."""
    _register(frontend, "orig", "vec_sum")
    _register(frontend, "mine", "vec_sum", rest_format="clipper", model="mine-model")
    status, body = http.post("/orig/predict", {"input_batch": [[1.0, 2.0]]})
    assert status == 200 and body["output"] == 3.0 and "batch_predictions" not in body
    status, body = http.post("/orig/predict", {"input_batch": [[1.0], [2.0, 5.0]]})
    assert [p["output"] for p in body["batch_predictions"]] == [1.0, 7.0]
    status, body = http.post("/mine/predict", {"input_batch": [[1.0, 2.0]]})
    assert [p["output"] for p in body["batch_predictions"]] == [3.0]


def test_metrics_json_and_describe_on_the_query_port(frontend, http):
    """Catches: GET /metrics or GET /<app> missing on the query port (404), the metrics not counting the
    queries, or the description not giving the input's dtype and shape."""
    _register(frontend, "orig", "vec_sum")
    for _ in range(3):
        assert http.post("/orig/predict", {"input": [1.0]})[0] == 200
    status, m = http.get("/metrics")
    assert status == 200 and {"app:orig:num_predictions": {"count": 3}} in m["counters"]
    assert m["applications"]["orig"]["answered"] == 3
    status, d = http.get("/orig")
    assert status == 200 and d["input_dtype"] == "float64" and d["wire_dtype"] == "<f8"
    assert d["input_shape"] == [-1] and d["slo_micros"] == 10_000_000 and d["linked_models"] == ["orig-model"]
    assert http.get("/orig/describe") == (200, d)
    status, body = http.get("/nope")
    assert status == 404 and body["error"]["code"] == 202


def test_describe_and_metrics_with_api_keys_required(frontend_factory):
    """Catches: GET /<app> answering without a key granting the application (it would tell what exists),
    or GET /metrics on the query port naming every application when keys are required."""
    import http.client

    from test_query_security import admin

    fe = frontend_factory(require_api_keys=True)
    fe.deploy("sum", "row_sum")
    key = admin(fe).create_api_key("sum")["key"]
    h = http.client.HTTPConnection("127.0.0.1", fe.fe.rest_port, timeout=30)

    def get(path, token=None):
        h.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = h.getresponse()
        return r.status, json.loads(r.read())

    assert get("/sum")[0] == 401
    status, d = get("/sum", key)
    assert status == 200 and d["input_shape"] == [4]
    assert get("/metrics", key)[0] == 403
    h.close()


def test_the_original_format_and_integer_vectors_survive_a_restart(frontend_factory, tmp_path):
    """Catches: rest_format lost by the state store (after a restart an original application answers in the
    Clipper format), or int32 vectors of any length refused over REST (JSON integers into the original's
    "integers" type)."""
    state = str(tmp_path / "state.sqlite")
    first = frontend_factory(state_path=state)
    _register(first, "ints", "as_json_text", dtype="int32", shape=(-1,))
    first.close()
    second = frontend_factory(state_path=state)
    second.call(second.fe.wait_ready("ints-model", "1", timeout_s=60))
    h = Http(second.fe.rest_port)
    status, body = h.post("/ints/predict", {"input_batch": [[1, 2, 3, 2**31 - 1]]})
    assert status == 200 and body["output"] == {"n": 4, "ok": True}
    status, body = h.post("/ints/predict", {"input": [2**31]})
    assert status == 400 and body["error"] == "INVALID_INPUT" and "int32" in body["cause"]
    h.close()
