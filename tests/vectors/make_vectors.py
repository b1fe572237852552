"""Regenerate the wire-protocol test vectors in this directory.

    python tests/vectors/make_vectors.py            # rewrite the .bin files and vectors.json
    python tests/vectors/make_vectors.py --check    # exit 1 if anything would change

Each vector is one complete frame (the 4-byte big-endian length, then the
msgpack body) in ``<name>.bin``, described in ``vectors.json``. The output is
deterministic: the same source gives byte-identical files.

Descriptions are JSON. Two values JSON cannot carry are written as tagged
objects:

* ``{"$ndarray": {"dtype": "<f4", "shape": [2, 2], "values": [...]}}`` -- an
  EXT_NDARRAY array; ``values`` lists the elements in C order (flat);
* ``{"$bin": "89504e47"}`` -- msgpack bin (bytes), as hex;
* ``{"$ext": {"type": 1, "hex": "..."}}`` -- a raw msgpack extension value
  (for a payload the codec refuses to build, such as an ndarray of 33
  dimensions).

A reply vector may name the request it ``answers`` (its code, name and id
are what a server sends that request: tests/test_vectors.py checks them on a
live server); a request the decoder refuses names the error code in
``decode_error``.

Every vector gives the message twice: ``message`` is the msgpack array in
order, ``fields`` names the same values as docs/protocol.md names them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgpack
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

from clipper.protocol import wire  # noqa: E402

# Field names of each message type, in wire order after the type code. A
# trailing "?" marks the optional last field (absent, never nil, when unused).
FIELDS = {
    "HELLO": ("id", "info"),
    "PREDICT": ("id", "app", "input", "options?"),
    "FEEDBACK": ("id", "app", "input", "label", "options?"),
    "PING": ("id",),
    "DESCRIBE": ("id", "app"),
    "HELLO_OK": ("id", "info"),
    "RESULT": ("id", "query_id", "output", "is_default", "extra?"),
    "FEEDBACK_OK": ("id", "info?"),
    "PONG": ("id",),
    "DESCRIPTION": ("id", "info"),
    "ERROR": ("id", "code", "name", "message"),
}
TYPE_CODES = {name: getattr(wire, name) for name in FIELDS}
CLIENT_TO_SERVER = "client->server"
SERVER_TO_CLIENT = "server->client"


def nd(dtype: str, shape: list, values: list) -> dict:
    return {"$ndarray": {"dtype": dtype, "shape": shape, "values": values}}


def binary(hex_text: str) -> dict:
    return {"$bin": hex_text}


# The vectors. Ids and query ids are illustrative; replies use the ids of the
# requests they would answer.
VECTORS = [
    {
        "name": "hello",
        "direction": CLIENT_TO_SERVER,
        "type": "HELLO",
        "fields": {"id": 0, "info": {"versions": [1], "client": "example-client/1.0"}},
        "description": "Opens a connection: the client offers protocol version 1.",
    },
    {
        "name": "hello_ok",
        "direction": SERVER_TO_CLIENT,
        "type": "HELLO_OK",
        "fields": {
            "id": 0,
            "info": {
                "version": 1,
                "server": "clipper/0.1.0",
                "limits": {
                    "max_frame_bytes": 16777216,
                    "max_input_bytes": 4194304,
                    "max_str_len": 1048576,
                    "max_array_len": 1048576,
                    "max_map_len": 4096,
                    "max_pending_per_connection": 65536,
                },
            },
        },
        "description": "The server chose version 1 and states its limits (the defaults).",
    },
    {
        "name": "hello_api_key",
        "direction": CLIENT_TO_SERVER,
        "type": "HELLO",
        "fields": {"id": 0, "info": {"versions": [1], "client": "example-client/1.0",
                                     "api_key": "clk_Vn3qJ8xT0bZk4YwR2mHs9dLc6pFa1uGe7iKo5rNtQ0w"}},
        "description": "Opens a connection and authenticates it with an API key (a server that requires "
        "API keys grants the key's applications to this connection from here on).",
    },
    {
        "name": "hello_ok_authenticated",
        "direction": SERVER_TO_CLIENT,
        "type": "HELLO_OK",
        "fields": {
            "id": 0,
            "info": {
                "version": 1,
                "server": "clipper/0.1.0",
                "limits": {
                    "max_frame_bytes": 16777216,
                    "max_input_bytes": 4194304,
                    "max_str_len": 1048576,
                    "max_array_len": 1048576,
                    "max_map_len": 4096,
                    "max_pending_per_connection": 65536,
                },
                "authenticated": True,
            },
        },
        "description": "A server that requires API keys accepted the HELLO's api_key.",
    },
    {
        "name": "predict_ndarray_f4",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 1, "app": "digits", "input": nd("<f4", [2, 2], [0.0, 0.5, -1.0, 2.25])},
        "description": "A query whose input is a 2x2 float32 array (EXT_NDARRAY). "
        "This is the worked example of docs/protocol.md.",
    },
    {
        "name": "predict_list",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 2, "app": "digits", "input": [[0.5, 1], [2, -3.25]]},
        "description": "A query whose input is a nested msgpack array of numbers; "
        "ints are accepted where the application takes floats.",
    },
    {
        "name": "predict_bytes",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 3, "app": "images", "input": binary("89504e470d0a1a0a")},
        "description": "A query for a 'bytes' application: the input is msgpack bin.",
    },
    {
        "name": "predict_str",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 4, "app": "sentiment", "input": "what a fine day"},
        "description": "A query for a 'str' application: the input is a msgpack str (UTF-8).",
    },
    {
        "name": "predict_options",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 5, "app": "digits", "input": [1, 2, 3], "options": {"user": "alice"}},
        "description": "A query with the optional options map.",
    },
    {
        "name": "feedback",
        "direction": CLIENT_TO_SERVER,
        "type": "FEEDBACK",
        "fields": {"id": 6, "app": "digits", "input": nd("<f4", [3], [1.0, 0.0, -1.0]), "label": 7},
        "description": "The true label (7) of an input.",
    },
    {
        "name": "feedback_ok",
        "direction": SERVER_TO_CLIENT,
        "type": "FEEDBACK_OK",
        "fields": {"id": 6},
        "description": "The server took the feedback of request 6.",
    },
    {
        "name": "feedback_user",
        "direction": CLIENT_TO_SERVER,
        "type": "FEEDBACK",
        "fields": {"id": 8, "app": "digits", "input": [1, 2, 3], "label": 3, "options": {"user": "alice"}},
        "description": "Feedback for the policy state of user alice.",
    },
    {
        "name": "feedback_ok_info",
        "direction": SERVER_TO_CLIENT,
        "type": "FEEDBACK_OK",
        "fields": {"id": 8, "info": {"models": ["logreg:1", "svm:2"], "missing": ["knn:1 (no answer in time)"]}},
        "description": "Feedback 8 was learned from two models' predictions; a third did not answer in time.",
    },
    {
        "name": "ping",
        "direction": CLIENT_TO_SERVER,
        "type": "PING",
        "fields": {"id": 7},
        "description": "Liveness check.",
    },
    {
        "name": "pong",
        "direction": SERVER_TO_CLIENT,
        "type": "PONG",
        "fields": {"id": 7},
        "description": "The answer to PING 7.",
    },
    {
        "name": "describe",
        "direction": CLIENT_TO_SERVER,
        "type": "DESCRIBE",
        "fields": {"id": 12, "app": "digits"},
        "description": "What does application \"digits\" take and answer?",
    },
    {
        "name": "description",
        "direction": SERVER_TO_CLIENT,
        "type": "DESCRIPTION",
        "fields": {"id": 12, "info": {"name": "digits", "input_dtype": "float64", "wire_dtype": "<f8",
                                      "input_shape": [64], "slo_ms": 20.0, "slo_micros": 20000,
                                      "output_kind": "auto", "default_output": None, "policy": "single",
                                      "linked_models": ["digits-logreg"]}},
        "description": "The answer to DESCRIBE 12: 64 float64 values (the config's float64, the wire's <f8), "
        "a 20 ms SLO.",
    },
    {
        "name": "result_scalar",
        "direction": SERVER_TO_CLIENT,
        "type": "RESULT",
        "fields": {"id": 1, "query_id": 1001, "output": 7, "is_default": False},
        "description": "The answer to request 1: the integer 7, from a model. "
        "This is the worked example of docs/protocol.md.",
    },
    {
        "name": "result_float",
        "direction": SERVER_TO_CLIENT,
        "type": "RESULT",
        "fields": {"id": 5, "query_id": 1005, "output": 0.75, "is_default": False},
        "description": "A float output (encoded as float64).",
    },
    {
        "name": "result_ndarray",
        "direction": SERVER_TO_CLIENT,
        "type": "RESULT",
        "fields": {
            "id": 2,
            "query_id": 1002,
            "output": nd("<f4", [4], [0.0, 0.25, 0.5, 0.25]),
            "is_default": False,
        },
        "description": "An array output (EXT_NDARRAY), e.g. class probabilities.",
    },
    {
        "name": "result_default",
        "direction": SERVER_TO_CLIENT,
        "type": "RESULT",
        "fields": {
            "id": 3,
            "query_id": 1003,
            "output": -1,
            "is_default": True,
            "extra": {"explanation": "no model answered within the 20 ms SLO"},
        },
        "description": "The SLO deadline passed: the application's default output, with why.",
    },
    {
        "name": "result_ensemble",
        "direction": SERVER_TO_CLIENT,
        "type": "RESULT",
        "fields": {
            "id": 4,
            "query_id": 1004,
            "output": 3,
            "is_default": False,
            "extra": {"confidence": 0.5, "models": ["logreg:1", "svm:2"],
                      "missing": ["knn:1 (no answer in time)"]},
        },
        "description": "Two of three selected models answered by the deadline and disagreed: the policy's "
        "combined answer, its confidence, which models answered and which were left out.",
    },
    {
        "name": "error_with_id",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": 2,
            "code": 204,
            "name": "SHAPE_MISMATCH",
            "message": "input has shape (2, 2); application 'digits' expects (784,)",
        },
        "description": "Request 2 failed: a request-level error.",
    },
    {
        "name": "error_nil_id",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": None,
            "code": 101,
            "name": "MALFORMED_FRAME",
            "message": "frame body is not valid msgpack: Unpack failed: incomplete input",
        },
        "description": "The server could not tell which request a frame belonged to "
        "(nil id); the connection stays usable.",
    },
    {
        "name": "error_unauthenticated",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": 1,
            "code": 208,
            "name": "UNAUTHENTICATED",
            "message": "the server requires API keys: authenticate with HELLO info api_key before PREDICT or "
            "FEEDBACK",
        },
        "description": "Request 1 came before the connection authenticated, on a server that requires API keys.",
    },
    {
        "name": "error_permission_denied",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": 9,
            "code": 209,
            "name": "PERMISSION_DENIED",
            "message": "the API key ak_5f1c0e9a2b7d4c3e does not grant application 'digits'",
        },
        "description": "Request 9 names an application the connection's API key does not grant.",
    },
    {
        "name": "error_overloaded",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": 12,
            "code": 309,
            "name": "OVERLOADED",
            "message": "model digits-logreg:1 cannot answer within the 20 ms SLO of application 'digits' "
            "(estimated 31.4 ms): refused at arrival",
        },
        "description": "Admission control refused request 12 at arrival; the client may send it again later.",
    },
    {
        "name": "error_shutting_down",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "fields": {
            "id": 13,
            "code": 310,
            "name": "SHUTTING_DOWN",
            "message": "the frontend is shutting down and takes no new queries",
        },
        "description": "Request 13 arrived while the server was draining.",
    },
    # ---- the rules of docs/protocol.md that leave nothing to guess. Each request has the reply a server
    # gives it ("answers"), in the context "context" names; tests/test_vectors.py checks them on a live server.
    {
        "name": "predict_ragged",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 20, "app": "digits", "input": [[1, 2], [3]]},
        "description": "A ragged list input (its arrays at one depth differ in length): not an array at all.",
    },
    {
        "name": "error_ragged",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "predict_ragged",
        "fields": {"id": 20, "code": 201, "name": "INVALID_INPUT",
                   "message": "list input is ragged (its arrays at one depth differ in length, or hold arrays beside "
                   "numbers): not an array; application 'digits' expects shape [2, 2]"},
        "description": "A ragged list is INVALID_INPUT (201), never SHAPE_MISMATCH: its structure is judged before "
        "its dtype and shape (section 4).",
    },
    {
        "name": "predict_dtype_and_shape",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 21, "app": "digits", "input": nd("<f8", [3], [1.0, 2.0, 3.0])},
        "description": "An array input of both the wrong dtype (float64) and the wrong shape ([3]).",
    },
    {
        "name": "error_dtype_before_shape",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "predict_dtype_and_shape",
        "fields": {"id": 21, "code": 203, "name": "DTYPE_MISMATCH",
                   "message": "input has dtype float64; application 'digits' expects float32"},
        "description": "Several rules broken: the first in the order of section 4 wins (dtype before shape).",
    },
    {
        "name": "predict_too_large",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 22, "app": "digits", "input": list(range(17))},
        "description": "A list input of 17 numbers (68 bytes as float32), also of the wrong shape.",
    },
    {
        "name": "error_too_large",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "predict_too_large",
        "fields": {"id": 22, "code": 205, "name": "INPUT_TOO_LARGE",
                   "message": "list input of 17 values (68 bytes as float32) exceeds max_input_bytes=64"},
        "description": "Size is judged before structure, dtype and shape: INPUT_TOO_LARGE (205), not "
        "SHAPE_MISMATCH (with max_input_bytes = 64).",
    },
    {
        "name": "predict_ndim_33",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "decode_error": 105,
        "fields": {"id": 26, "app": "digits", "input": {"$ext": {"type": 1, "hex": "033c6634210000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000000100000001000000010000803f"}}},
        "description": "An EXT_NDARRAY with ndim 33 (each dimension 1, one float32): past MAX_NDIM, so the frame "
        "cannot be decoded.",
    },
    {
        "name": "error_ndim_limit",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "predict_ndim_33",
        "fields": {"id": None, "code": 105, "name": "LIMIT_EXCEEDED",
                   "message": "ndarray has 33 dimensions; at most 32 allowed"},
        "description": "ndim above 32 is a decoding limit: LIMIT_EXCEEDED (105) with a nil id, as every decoding "
        "limit (section 5).",
    },
    {
        "name": "hello_without_versions",
        "direction": CLIENT_TO_SERVER,
        "type": "HELLO",
        "fields": {"id": 23, "info": {"client": "example-client/1.0"}},
        "description": "A HELLO without its required \"versions\".",
    },
    {
        "name": "error_hello_without_versions",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "hello_without_versions",
        "fields": {"id": 23, "code": 101, "name": "MALFORMED_FRAME",
                   "message": "HELLO info lacks \"versions\" (required): an array of the protocol versions the "
                   "client speaks"},
        "description": "A HELLO without versions is MALFORMED_FRAME (101) with its id; nothing is negotiated.",
    },
    {
        "name": "hello_again",
        "direction": CLIENT_TO_SERVER,
        "type": "HELLO",
        "fields": {"id": 24, "info": {"versions": [2], "client": "example-client/1.0"}},
        "description": "A second HELLO, after the first was answered HELLO_OK with version 1, offering only "
        "version 2.",
    },
    {
        "name": "error_hello_again",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "hello_again",
        "fields": {"id": 24, "code": 103, "name": "UNSUPPORTED_VERSION",
                   "message": "this connection speaks protocol version 1 since its first HELLO; a later HELLO must "
                   "offer it (it offers [2]); nothing was changed"},
        "description": "The first HELLO_OK fixes the version; a later HELLO (to authenticate again) must offer it, "
        "else UNSUPPORTED_VERSION (103) and nothing changes (section 7).",
    },
    {
        "name": "predict_duplicate_id",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 1, "app": "digits", "input": [[5, 6], [7, 8]]},
        "description": "A PREDICT with id 1 sent while the PREDICT of vector predict_list_1 (id 1) still awaits "
        "its reply on the same connection.",
    },
    {
        "name": "predict_list_1",
        "direction": CLIENT_TO_SERVER,
        "type": "PREDICT",
        "fields": {"id": 1, "app": "digits", "input": [[1, 2], [3, 4]]},
        "description": "A query with id 1 (in the live check, its model takes half a second to answer).",
    },
    {
        "name": "error_duplicate_id",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "predict_duplicate_id",
        "fields": {"id": 1, "code": 106, "name": "DUPLICATE_REQUEST_ID",
                   "message": "request id 1 is held by a request still awaiting its reply on this connection; an "
                   "id may be used again only once its reply has arrived"},
        "description": "The duplicate is refused at once; the earlier request 1 is unaffected and gets its own "
        "RESULT later (section 6).",
    },
    {
        "name": "feedback_over_pending_limit",
        "direction": CLIENT_TO_SERVER,
        "type": "FEEDBACK",
        "fields": {"id": 27, "app": "digits", "input": [[1, 2], [3, 4]], "label": 3},
        "description": "Feedback sent while the connection already has max_pending_per_connection requests "
        "awaiting replies (here 1: the PREDICT of vector predict_list_1).",
    },
    {
        "name": "error_pending_limit",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "feedback_over_pending_limit",
        "fields": {"id": 27, "code": 105, "name": "LIMIT_EXCEEDED",
                   "message": "1 requests are pending on this connection; max_pending_per_connection is 1"},
        "description": "FEEDBACK counts against max_pending_per_connection as PREDICT does (section 6).",
    },
    {
        "name": "feedback_nil_label",
        "direction": CLIENT_TO_SERVER,
        "type": "FEEDBACK",
        "fields": {"id": 25, "app": "digits", "input": [[1, 2], [3, 4]], "label": None},
        "description": "Feedback whose label is nil.",
    },
    {
        "name": "error_invalid_label",
        "direction": SERVER_TO_CLIENT,
        "type": "ERROR",
        "answers": "feedback_nil_label",
        "fields": {"id": 25, "code": 212, "name": "INVALID_LABEL",
                   "message": "label None (nil) does not fit application 'digits', whose output_kind is 'auto': "
                   "expected a class (an integer or a str), a finite number, or a vector of finite numbers"},
        "description": "A label that does not fit the application's output kind is INVALID_LABEL (212) (section 3).",
    },
]


# ------------------------------------------------------------------ conversion
def from_json(value):
    """The Python value (as the reference codec takes it) of a JSON description."""
    if isinstance(value, dict) and set(value) == {"$ext"}:
        return msgpack.ExtType(value["$ext"]["type"], bytes.fromhex(value["$ext"]["hex"]))
    if isinstance(value, dict):
        if set(value) == {"$ndarray"}:
            spec = value["$ndarray"]
            arr = np.array(spec["values"], dtype=np.dtype(spec["dtype"]))
            return arr.reshape(spec["shape"])
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def message_json(vector: dict) -> list:
    """The message array (tagged JSON) of a vector, built from its fields."""
    msg = [TYPE_CODES[vector["type"]]]
    fields = vector["fields"]
    for name in FIELDS[vector["type"]]:
        optional = name.endswith("?")
        name = name.rstrip("?")
        if name in fields:
            msg.append(fields[name])
        elif not optional:
            raise KeyError(f"vector {vector['name']!r} lacks field {name!r}")
    unknown = set(fields) - {n.rstrip("?") for n in FIELDS[vector["type"]]}
    if unknown:
        raise KeyError(f"vector {vector['name']!r} has unknown fields {sorted(unknown)}")
    return msg


def encode(vector: dict) -> bytes:
    """The complete frame of a vector, as the reference codec writes it."""
    return wire.frame(wire.pack(from_json(message_json(vector))))


def render() -> dict[str, bytes]:
    """Every file this script writes: name -> content."""
    files = {}
    entries = []
    for vector in VECTORS:
        data = encode(vector)
        file = f"{vector['name']}.bin"
        files[file] = data
        entry = {
            "name": vector["name"],
            "file": file,
            "direction": vector["direction"],
            "type": vector["type"],
            "type_code": TYPE_CODES[vector["type"]],
            "description": vector["description"],
            "fields": vector["fields"],
            "message": message_json(vector),
            "hex": data.hex(),
        }
        for key in ("answers", "decode_error"):
            if key in vector:
                entry[key] = vector[key]
        entries.append(entry)
    doc = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "format": "each .bin file is one complete frame: 4-byte big-endian body length, then the "
        "msgpack body. '$ndarray' = EXT_NDARRAY (values flat, C order); '$bin' = msgpack bin "
        "as hex; '$ext' = a raw msgpack extension (type, payload as hex). 'answers': the request a reply "
        "vector answers (a live server's reply has its id, code and name); 'decode_error': the code a "
        "request the decoder refuses gets. The bytes are the reference encoder's (shortest int and length forms, floats "
        "as float64, map keys in the order listed); a decoder must accept any valid msgpack "
        "form of the same message.",
        "field_order": {name: list(order) for name, order in FIELDS.items()},
        "vectors": entries,
    }
    files["vectors.json"] = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_bytes() != content:
                stale.append(name)
        else:
            path.write_bytes(content)
    if stale:
        print("stale test vectors: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
