"""The wire test vectors (tests/vectors/): encoding each described message gives
exactly its bytes, and decoding the bytes gives the described message."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest

import clipper._native.framing_py as framing_py
from clipper.config import Limits
from clipper.errors import ClipperError, error_for_code
from clipper.protocol import wire


framing_native = importlib.import_module("clipper._native._framing")
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
DOC = json.loads((VECTORS_DIR / "vectors.json").read_text())
VECTORS = DOC["vectors"]
IDS = [v["name"] for v in VECTORS]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS_DIR / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_python(value):
    """Tagged JSON (see vectors.json "format") -> the value the codec takes."""
    if isinstance(value, dict) and set(value) == {"$ext"}:
        return msgpack.ExtType(value["$ext"]["type"], bytes.fromhex(value["$ext"]["hex"]))
    if isinstance(value, dict):
        if set(value) == {"$ndarray"}:
            spec = value["$ndarray"]
            dtype = wire.ALLOWED_DTYPES[spec["dtype"]]
            return np.array(spec["values"], dtype=dtype).reshape(spec["shape"])
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_python(v) for v in value]
    return value


def assert_same(decoded, expected, where="message"):
    """Deep equality that also checks types (bool vs int, bytes vs str) and arrays."""
    if isinstance(expected, np.ndarray):
        assert isinstance(decoded, np.ndarray), where
        assert decoded.dtype == expected.dtype, where
        assert decoded.shape == expected.shape, where
        assert decoded.tobytes() == expected.tobytes(), where
        assert not decoded.flags.writeable, f"{where}: decoded arrays are read-only views"
    elif isinstance(expected, dict):
        assert type(decoded) is dict and list(decoded) == list(expected), where
        for k in expected:
            assert_same(decoded[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert type(decoded) is list and len(decoded) == len(expected), where
        for i, (d, e) in enumerate(zip(decoded, expected)):
            assert_same(d, e, f"{where}[{i}]")
    else:
        assert type(decoded) is type(expected) and decoded == expected, f"{where}: {decoded!r} != {expected!r}"


def build_with_wire(vector) -> list:
    """The message made by the wire module's builder for its type."""
    f = {k: to_python(v) for k, v in vector["fields"].items()}
    kind = vector["type"]
    if kind == "HELLO" and "versions" not in f["info"]:
        return [wire.HELLO, f["id"], f["info"]]  # (a malformed HELLO: the builder always sends versions)
    if kind == "HELLO":
        return wire.hello(f["id"], f["info"]["versions"], f["info"]["client"], f["info"].get("api_key"))
    if kind == "PREDICT":
        return wire.predict(f["id"], f["app"], f["input"], f.get("options"))
    if kind == "FEEDBACK":
        return wire.feedback(f["id"], f["app"], f["input"], f["label"], f.get("options"))
    if kind == "PING":
        return wire.ping(f["id"])
    if kind == "HELLO_OK":
        info = f["info"]
        return wire.hello_ok(f["id"], info["version"], info["server"], info["limits"], info.get("authenticated"))
    if kind == "RESULT":
        return wire.result(f["id"], f["query_id"], f["output"], f["is_default"], f.get("extra"))
    if kind == "FEEDBACK_OK":
        return wire.feedback_ok(f["id"], f.get("info"))
    if kind == "PONG":
        return wire.pong(f["id"])
    if kind == "DESCRIBE":
        return wire.describe(f["id"], f["app"])
    if kind == "DESCRIPTION":
        return wire.description(f["id"], f["info"])
    if kind == "ERROR":
        return wire.error(f["id"], error_for_code(f["code"], f["message"]))
    raise AssertionError(f"no builder for {kind}")


def frame_bytes(vector) -> bytes:
    return (VECTORS_DIR / vector["file"]).read_bytes()


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_file_is_one_frame_matching_the_hex(vector):
    data = frame_bytes(vector)
    assert data.hex() == vector["hex"]
    assert int.from_bytes(data[:4], "big") == len(data) - 4


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_fields_and_message_agree(vector):
    kind = vector["type"]
    assert vector["type_code"] == getattr(wire, kind)
    assert vector["message"][0] == vector["type_code"]
    order = DOC["field_order"][kind]
    names = [n.rstrip("?") for n in order]
    assert set(vector["fields"]) <= set(names)
    rebuilt = [vector["type_code"]] + [vector["fields"][n] for n in names if n in vector["fields"]]
    assert rebuilt == vector["message"]
    expected_direction = "client->server" if vector["type_code"] < 64 else "server->client"
    assert vector["direction"] == expected_direction


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_encoding_gives_the_bytes(vector):
    data = frame_bytes(vector)
    assert wire.frame(wire.pack(to_python(vector["message"]))) == data
    assert wire.frame(wire.pack(build_with_wire(vector))) == data
    body = wire.pack(build_with_wire(vector))
    assert framing_py.pack_frame(body) == data
    assert framing_native.pack_frame(body) == data


@pytest.mark.parametrize("impl", [framing_py, framing_native], ids=["python", "native"])
@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_decoding_gives_the_message(vector, impl):
    reader = impl.FrameReader(wire.DecodeLimits().max_frame_bytes)
    bodies = reader.feed(frame_bytes(vector))
    assert len(bodies) == 1 and reader.buffered == 0
    if "decode_error" in vector:  # a frame the decoder refuses, with that code
        with pytest.raises(ClipperError) as info:
            wire.make_unpacker()(bytes(bodies[0]))
        assert info.value.code == vector["decode_error"]
        return
    decoded = wire.make_unpacker()(bytes(bodies[0]))
    assert_same(decoded, to_python(vector["message"]))


def test_all_vectors_as_one_pipelined_stream():
    stream = b"".join(frame_bytes(v) for v in VECTORS)
    for impl in (framing_py, framing_native):
        reader = impl.FrameReader(1 << 20)
        bodies = []
        for i in range(0, len(stream), 7):  # arbitrary chunking
            bodies += [bytes(b) for b in reader.feed(stream[i : i + 7])]
        assert bodies == [frame_bytes(v)[4:] for v in VECTORS]


def test_every_message_type_and_required_case_is_covered():
    types = {v["type"] for v in VECTORS}
    assert types == set(DOC["field_order"]) == {
        "HELLO", "PREDICT", "FEEDBACK", "PING", "DESCRIBE", "HELLO_OK", "RESULT", "FEEDBACK_OK", "PONG",
        "DESCRIPTION", "ERROR"}
    names = set(IDS)
    assert {"predict_ndarray_f4", "predict_list", "predict_bytes", "predict_options", "result_scalar",
            "result_ndarray", "result_default", "error_with_id", "error_nil_id", "hello_api_key",
            "hello_ok_authenticated", "error_unauthenticated", "error_permission_denied",
            # one per rule of the spec that a client once had to guess (issue 12)
            "error_ragged", "error_dtype_before_shape", "error_too_large", "error_ndim_limit",
            "error_hello_without_versions", "error_hello_again", "error_duplicate_id", "error_pending_limit",
            "error_invalid_label"} <= names
    for v in VECTORS:
        if "answers" in v:
            assert v["answers"] in names and v["type"] == "ERROR"
    assert next(v for v in VECTORS if v["name"] == "error_nil_id")["fields"]["id"] is None


def test_error_vectors_use_the_error_tree():
    for v in VECTORS:
        if v["type"] == "ERROR":
            f = v["fields"]
            assert error_for_code(f["code"], "").name == f["name"]


def test_hello_ok_limits_are_the_server_defaults():
    limits = next(v for v in VECTORS if v["type"] == "HELLO_OK")["fields"]["info"]["limits"]
    defaults = dataclasses.asdict(Limits())
    assert {k: defaults[k] for k in limits} == limits


def test_generator_is_deterministic_and_up_to_date():
    gen = _load_generator()
    first, second = gen.render(), gen.render()
    assert first == second
    on_disk = {p.name: p.read_bytes() for p in VECTORS_DIR.iterdir() if p.suffix in (".bin", ".json")}
    assert first == on_disk, "run `python tests/vectors/make_vectors.py` and commit the result"


# ------------------------------------------------------------------ the replies a live server gives
# The setting of the vectors that answer a request: application 'digits' (float32, shape [2, 2], output_kind
# auto) whose model answers in 0.5 s; max_input_bytes = 64 and max_pending_per_connection = 1; the connection's
# first HELLO was answered HELLO_OK. The replies in WHILE_ONE_IS_PENDING are sent while request 1 (vector
# predict_list_1) awaits its reply; the others once it is answered.
WHILE_ONE_IS_PENDING = {"error_duplicate_id", "error_pending_limit"}


def test_reply_vectors_are_what_a_live_server_answers(frontend_factory, wire_conn):
    """Catches: the server and the written rules disagreeing (which error wins when several apply, HELLO,
    duplicate ids, the pending limit, labels, ndim): each reply vector that "answers" a request is what a
    live server (native fast paths included) sends for exactly that request's bytes -- same id, code and
    name."""
    fe = frontend_factory(max_input_bytes=64, max_pending_per_connection=1)
    fe.deploy("digits", "row_sum_after_sleep", dtype="float32", shape=(2, 2), env={"CLIPPER_TEST_SLEEP_S": "0.5"})
    by_name = {v["name"]: v for v in VECTORS}
    replies = [v for v in VECTORS if "answers" in v]
    assert WHILE_ONE_IS_PENDING <= {v["name"] for v in replies}
    c = wire_conn(fe.port)
    c.send(wire.hello(0))
    assert c.recv(1)[0][0] == wire.HELLO_OK

    def check(reply):
        c.send_raw(frame_bytes(by_name[reply["answers"]]))
        got = c.recv(1)[0]
        f = reply["fields"]
        assert got[:4] == [wire.ERROR, f["id"], f["code"], f["name"]], (reply["name"], got)

    c.send_raw(frame_bytes(by_name["predict_list_1"]))  # in flight for half a second: its id is held
    for reply in replies:
        if reply["name"] in WHILE_ONE_IS_PENDING:
            check(reply)
    first = c.recv(1)[0]
    assert first[:2] == [wire.RESULT, 1] and first[3] == 10.0  # the earlier request 1 got its own answer
    for reply in replies:
        if reply["name"] not in WHILE_ONE_IS_PENDING:
            check(reply)
