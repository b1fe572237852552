"""The REST query interface against a real frontend and real containers."""

from __future__ import annotations

import base64
import http.client as httpc
import json
import socket

import pytest

from clipper import errors as E


class Http:
    """One keep-alive HTTP/1.1 connection (http.client parses the answers; the server uses httptools)."""

    def __init__(self, port: int) -> None:
        self.conn = httpc.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def get(self, path: str) -> tuple[int, dict]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def served(frontend):
    frontend.deploy("sum", "row_sum")
    return frontend


@pytest.fixture
def rest(served):
    h = Http(served.fe.rest_port)
    yield h
    h.close()


def test_predict_one_and_a_batch_on_one_keep_alive_connection(served, rest):
    status, out = rest.post("/sum/predict", {"input": [1.0, 2.0, 3.0, 4.0]})
    assert status == 200 and out["output"] == 10.0 and out["default"] is False
    assert out["confidence"] == 1.0 and out["models"] == ["sum-model:1"] and isinstance(out["query_id"], int)
    status, out = rest.post("/sum/predict", {"input_batch": [[1, 1, 1, 1], [0, 0, 0, 2], "nope"]})
    assert status == 200
    preds = out["batch_predictions"]
    assert [p.get("output") for p in preds[:2]] == [4.0, 2.0]
    assert preds[2]["error"]["code"] == E.InvalidInputError.code
    status, out = rest.post("/sum/predict", {"input_batch": []})
    assert status == 200 and out == {"batch_predictions": []}


def test_integers_are_accepted_for_a_float_application(served, rest):
    # The original Clipper rejected [1, 2] for a doubles application.
    status, out = rest.post("/sum/predict", {"input": [1, 2, 3, 4]})
    assert status == 200 and out["output"] == 10.0


@pytest.mark.parametrize("path, body, status, code", [
    ("/nope/predict", {"input": [1, 2, 3, 4]}, 404, E.UnknownApplicationError.code),
    ("/sum/predict", {"input": [1, 2, 3]}, 400, E.ShapeMismatchError.code),
    ("/sum/predict", {"input": [1.5, "x", 3, 4]}, 400, E.DTypeMismatchError.code),
    ("/sum/predict", {"inputs": [1, 2, 3, 4]}, 400, E.InvalidInputError.code),
    ("/sum/predict", [1, 2, 3, 4], 400, E.InvalidInputError.code),
    ("/sum/predict", {"input_batch": {"a": 1}}, 400, E.InvalidInputError.code),
    ("/sum/update", {"input": [1, 2, 3, 4]}, 400, E.InvalidInputError.code),
    ("/sum/explain", {"input": [1, 2, 3, 4]}, 404, E.RequestError.code),
    ("/sum/predict", {"input": [1, 2, 3, 4], "user": 7}, 400, E.InvalidInputError.code),
])
def test_every_error_is_json_with_the_protocol_code(served, rest, path, body, status, code):
    got, out = rest.post(path, body)
    assert got == status and out["error"]["code"] == code
    assert out["error"]["name"] == E.error_for_code(code, "").name and out["error"]["message"]
    # and the connection goes on
    assert rest.post("/sum/predict", {"input": [0, 0, 0, 1]})[1]["output"] == 1.0


def test_body_that_is_not_json_and_a_wrong_method(served, rest):
    status, out = rest.post("/sum/predict", None, raw=b"{not json")
    assert status == 400 and out["error"]["code"] == E.InvalidInputError.code and "not JSON" in out["error"]["message"]
    status, out = rest.get("/sum/predict")
    assert status == 405 and out["error"]["code"] == E.RequestError.code


def test_a_body_over_the_limit_gets_413(frontend_factory):
    fe = frontend_factory(max_frame_bytes=1024)
    fe.deploy("sum", "row_sum")
    h = Http(fe.fe.rest_port)
    try:
        status, out = h.post("/sum/predict", {"input": [1.0] * 4, "pad": "x" * 4000})
        assert status == 413 and out["error"]["code"] == E.FrameTooLargeError.code
        assert h.post("/sum/predict", {"input": [1, 1, 1, 1]})[1]["output"] == 4.0
    finally:
        h.close()


def test_a_body_of_more_arrays_than_max_decoded_objects_is_refused_before_parsing(frontend_factory):
    # "[]," is three bytes and a Python list 56+: such a body is counted before it is parsed
    fe = frontend_factory(max_decoded_objects=1000)
    fe.deploy("sum", "row_sum")
    h = Http(fe.fe.rest_port)
    try:
        status, out = h.post("/sum/predict", {"input": [1.0] * 4, "pad": [[] for _ in range(1000)]})
        assert status == 400 and out["error"]["code"] == E.LimitExceededError.code
        assert "max_decoded_objects" in out["error"]["message"]
        status, out = h.post("/sum/predict", {"input": [1.0] * 4, "pad": [0] * 2000})  # long, few arrays: parsed
        assert status == 200 and out["output"] == 4.0
    finally:
        h.close()


def test_health_and_readiness(frontend):
    h = Http(frontend.fe.rest_port)
    try:
        assert h.get("/healthz") == (200, {"status": "ok"})
        from clipper.management.registry import Application

        frontend.call(frontend.fe.register_application(Application("orphan", "float32", [4])))
        status, out = h.get("/readyz")
        assert status == 503 and out["ready"] is False and "orphan" in out["not_ready"][0]
        frontend.call(frontend.fe.unregister_application("orphan"))
        frontend.deploy("sum", "row_sum")
        assert h.get("/readyz") == (200, {"ready": True})
    finally:
        h.close()


def test_bytes_and_str_applications(frontend):
    frontend.deploy("rev", "reverse_bytes", dtype="bytes", shape=())
    frontend.deploy("shout", "shout", dtype="str", shape=(), model="shout-model")
    h = Http(frontend.fe.rest_port)
    try:
        status, out = h.post("/rev/predict", {"input": base64.b64encode(b"abc").decode()})
        assert status == 200 and base64.b64decode(out["output"]) == b"cba"
        status, out = h.post("/rev/predict", {"input": "not base64!"})
        assert status == 400 and "base64" in out["error"]["message"]
        status, out = h.post("/shout/predict", {"input": "héllo"})
        assert status == 200 and out["output"] == "HÉLLO:str"
    finally:
        h.close()


def test_update_sends_feedback_to_the_policy(frontend):
    frontend.deploy_ensemble("learn", [("right", "first_as_label", None),
                                       ("wrong", "constant", {"CLIPPER_TEST_CONST": "0"})], output_kind="label")
    h = Http(frontend.fe.rest_port)
    try:
        status, out = h.post("/learn/update", {"input": [3, 0, 0, 0], "label": 3, "user": "ann"})
        assert status == 200 and out["ok"] is True and out["models"] == ["right:1", "wrong:1"]
        assert frontend.state("learn", "ann")["logw"]["wrong"] == pytest.approx(-0.2)
        status, out = h.post("/learn/update", {"uid": 7, "input": [2, 0, 0, 0], "label": 2})  # the original's key
        assert status == 200 and frontend.state("learn", "7")["logw"]["wrong"] == pytest.approx(-0.2)
        status, out = h.post("/learn/predict", {"input": [5, 0, 0, 0], "user": "ann"})
        assert status == 200 and out["output"] == 5 and 0.5 < out["confidence"] < 1
    finally:
        h.close()


def test_pipelined_requests_are_answered_in_order_and_garbage_closes_only_its_connection(served):
    port = served.fe.rest_port
    body = json.dumps({"input": [1, 2, 3, 4]}).encode()
    req = (b"POST /sum/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    bad = json.dumps({"input": [1]}).encode()
    req_bad = (b"POST /sum/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(req + req_bad + req)
        data = b""
        while data.count(b"HTTP/1.1") < 3 or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    parts = data.split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"200", b"400", b"200"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"MALFORMED_FRAME" in reply
    h = Http(port)
    try:
        assert h.post("/sum/predict", {"input": [1, 1, 1, 1]})[1]["output"] == 4.0
    finally:
        h.close()


def test_no_model_to_answer_is_503_for_an_application_that_wants_errors(frontend):
    from clipper.management.registry import Application

    frontend.call(frontend.fe.register_application(Application("lonely", "float32", [4], on_deadline="error")))
    h = Http(frontend.fe.rest_port)
    try:
        status, out = h.post("/lonely/predict", {"input": [1, 2, 3, 4]})
        assert status == 503 and out["error"]["code"] == E.NoModelAvailableError.code
        status, out = h.post("/lonely/predict", {"input_batch": [[1, 2, 3, 4]]})
        assert status == 200 and out["batch_predictions"][0]["error"]["code"] == E.NoModelAvailableError.code
    finally:
        h.close()


def test_a_connection_past_max_connections_gets_503_and_the_first_goes_on(frontend_factory):
    fe = frontend_factory(max_connections=1)
    fe.deploy("sum", "row_sum")
    first = Http(fe.fe.rest_port)
    try:
        assert first.post("/sum/predict", {"input": [1, 1, 1, 1]})[1]["output"] == 4.0
        with socket.create_connection(("127.0.0.1", fe.fe.rest_port), timeout=30) as s:
            reply = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 503") and b"max_connections is 1" in reply
        assert first.post("/sum/predict", {"input": [2, 2, 2, 2]})[1]["output"] == 8.0
    finally:
        first.close()


def test_a_bug_in_one_item_of_a_batch_fails_that_item_alone(frontend_factory):
    """A fault inside the query processor (not a ClipperError) while starting one input of an ``input_batch``:
    that item answers INTERNAL_ERROR, the others their outputs, the request 200; the connection's in-flight
    count comes back (max_pending_per_connection is 3, so a leaked count refuses the next request).

    Mutations caught: the per-item ``except Exception`` in ``RestConnection._handle`` removed (the whole
    request answers 500 and the count leaks); that branch logging without ``send_error`` (the reply never
    completes: the client times out)."""
    fe = frontend_factory(max_pending_per_connection=3)
    fe.deploy("sum", "row_sum")
    proc = fe.fe.processor
    real_predict = proc.predict

    def buggy(conn, req_id, app_name, x, options=None):
        if float(x[0]) == 13.0:
            raise KeyError("a bug on the query path (injected by the test)")
        return real_predict(conn, req_id, app_name, x, options)

    fe.call(lambda: setattr(proc, "predict", buggy))
    h = Http(fe.fe.rest_port)
    h.conn.timeout = 15
    try:
        for _ in range(3):  # again and again on one connection: nothing leaks
            status, out = h.post("/sum/predict", {"input_batch": [[1, 1, 1, 1], [13, 0, 0, 0], [2, 0, 0, 0]]})
            assert status == 200, out
            first, bad, last = out["batch_predictions"]
            assert first["output"] == 4.0 and last["output"] == 2.0
            assert bad["error"]["code"] == E.InternalError.code and "KeyError" in bad["error"]["message"], bad
        status, out = h.post("/sum/predict", {"input": [13, 0, 0, 0]})  # a single input: 500, typed
        assert status == 500 and out["error"]["code"] == E.InternalError.code
        status, out = h.post("/sum/predict", {"input_batch": [[3, 0, 0, 0]] * 3})
        assert status == 200 and [p["output"] for p in out["batch_predictions"]] == [3.0] * 3
    finally:
        h.close()
    assert fe.call(lambda: sum(c.in_flight for c in fe.fe.rest.connections)) == 0
