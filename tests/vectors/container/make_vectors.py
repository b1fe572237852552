"""Regenerate the container RPC's test vectors (``vectors.json`` in this directory).

    python tests/vectors/container/make_vectors.py            # rewrite vectors.json
    python tests/vectors/container/make_vectors.py --check    # exit 1 if it would change

Each vector is one container RPC message (docs/container-protocol.md) as the
frames a container's DEALER socket sends or receives: the ROUTER's routing
identity frame is not part of it. ``frames`` holds the hex of each frame;
``header`` the msgpack header array (frame 0) as JSON; ``payload`` describes
frame 1, when there is one:

* ``{"nd": {"dtype": "<f4", "shape": [2, 4], "values": [...]}}``: raw
  little-endian C-order elements (``values`` flat);
* ``{"vl": {"kind": "str" | "bytes", "items": [...]}}``: count + 1 uint64
  offsets, then the items' bytes (bytes items as ``{"$bin": hex}``);
* ``{"mp": [...]}``: a msgpack array, numpy arrays inside as EXT_NDARRAY
* ``{"vla": {"dtype", "items": [{"shape", "values"}]}}``: arrays of one dtype and any shapes, as one buffer
  (``{"$ndarray": {...}}``, docs/protocol.md section 5).

The bytes are built here from the spec's rules (msgpack for headers, numpy
and struct for buffers), not by the code under test: tests/test_container_vectors.py
checks that the frontend and the container SDK produce and accept exactly
these bytes. The vectors read as one conversation: the container says hello,
is welcomed, and answers the four batches it is sent in turn.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import msgpack
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))  # run from a checkout without installing

from clipper.protocol import wire  # noqa: E402 - after the sys.path line. EXT_NDARRAY: the client protocol's array encoding

OUT = HERE / "vectors.json"
C2F = "container->frontend"
F2C = "frontend->container"

# The header fields of each message type, after the type code, in wire order.
FIELDS = {
    "C_HELLO": ("rpc_version", "info"),
    "C_HEARTBEAT": (),
    "C_RESULT": ("batch_id", "count", "encoding", "meta"),
    "C_ERROR": ("batch_id", "code", "message"),
    "C_BYE": (),
    "F_WELCOME": ("replica_id", "options"),
    "F_BATCH": ("batch_id", "count", "encoding", "meta"),
    "F_HEARTBEAT": (),
    "F_REJECT": ("message",),
    "F_REHELLO": (),
}
TYPE_CODES = {"C_HELLO": 1, "C_HEARTBEAT": 2, "C_RESULT": 3, "C_ERROR": 4, "C_BYE": 5,
              "F_WELCOME": 1, "F_BATCH": 2, "F_HEARTBEAT": 3, "F_REJECT": 4, "F_REHELLO": 5}

HELLO_INFO = {"model": "digits", "version": "1", "pid": 4242, "sdk": "clipper-container/0.1",
              "credential_id": "0123456789abcdef", "input_dtype": "float32", "input_shape": [4],
              "load_ms": 12.5, "rss_bytes": 104857600}


def nd(dtype: str, shape: list, values: list) -> dict:
    return {"nd": {"dtype": dtype, "shape": shape, "values": values}}


VECTORS = [
    {"name": "c_hello", "type": "C_HELLO", "header": [1, 1, HELLO_INFO],
     "description": "The container's first message on a new connection: RPC version 1 and who it says it is."},
    {"name": "f_welcome", "type": "F_WELCOME",
     "header": [1, 1, {"heartbeat_interval_ms": 1000, "heartbeat_timeout_ms": 5000}],
     "description": "The frontend accepts the hello: replica id 1, heartbeats every second, silence for 5 s is death "
                    "(the default configuration)."},
    {"name": "c_heartbeat", "type": "C_HEARTBEAT", "header": [2],
     "description": "The container is alive (every heartbeat_interval_ms, also while a batch runs)."},
    {"name": "f_heartbeat", "type": "F_HEARTBEAT", "header": [3],
     "description": "The frontend is alive."},
    {"name": "f_batch_nd_f4", "type": "F_BATCH", "header": [2, 7, 2, "nd", ["<f4", [2, 4]]],
     "payload": nd("<f4", [2, 4], [1, 2, 3, 4, 5, 6, 7, 8]),
     "description": "Batch 7: two float32 inputs of shape [4], one contiguous little-endian row-major buffer."},
    {"name": "c_result_nd_f8", "type": "C_RESULT", "header": [3, 7, 2, "nd", ["<f8", [2]]],
     "payload": nd("<f8", [2], [10.0, 26.0]),
     "description": "The answer to batch 7: one float64 per input (the row sums)."},
    {"name": "f_batch_vl_str", "type": "F_BATCH", "header": [2, 8, 3, "vl", ["str"]],
     "payload": {"vl": {"kind": "str", "items": ["h\u00e9llo", "", "ab"]}},
     "description": "Batch 8: three str inputs (an application of dtype \"str\"): 4 offsets, then UTF-8 bytes; "
                    "the second item is empty."},
    {"name": "c_error", "type": "C_ERROR", "header": [4, 8, 301, "ValueError: cannot classify an empty string"],
     "description": "Batch 8 failed: MODEL_ERROR (301) with the model's message; every query of the batch gets it."},
    {"name": "f_batch_vl_bytes", "type": "F_BATCH", "header": [2, 9, 2, "vl", ["bytes"]],
     "payload": {"vl": {"kind": "bytes", "items": [{"$bin": "00ff"}, {"$bin": "706e67"}]}},
     "description": "Batch 9: two bytes inputs (an application of dtype \"bytes\")."},
    {"name": "c_result_nd_2d", "type": "C_RESULT", "header": [3, 9, 2, "nd", ["<f4", [2, 3]]],
     "payload": nd("<f4", [2, 3], [2, 0, 255, 3, 112, 103]),
     "description": "The answer to batch 9: a float32 vector of 3 per input (output i is row i)."},
    {"name": "f_batch_vl_array", "type": "F_BATCH", "header": [2, 10, 2, "vl", ["array", "<f4", 1]],
     "payload": {"vla": {"dtype": "<f4", "items": [{"shape": [2], "values": [0.5, 1.5]},
                                                  {"shape": [3], "values": [1, 2, 3]}]}},
     "description": "Batch 10, for a model deployed with input shape [-1] (a dimension of any length): two "
                    "float32 vectors of different lengths in one buffer: 3 byte offsets, 2 x 1 dimensions "
                    "(uint64 little-endian), then the data."},
    {"name": "c_result_mp", "type": "C_RESULT", "header": [3, 10, 2, "mp", None],
     "payload": {"mp": ["cat", {"p": 0.25, "label": 3}]},
     "description": "The answer to batch 10 as a msgpack array of 2 outputs (any msgpack values)."},
    {"name": "c_bye", "type": "C_BYE", "header": [5],
     "description": "The container leaves (on SIGTERM): the frontend drops it at once, retrying what it held."},
    {"name": "f_rehello", "type": "F_REHELLO", "header": [5],
     "description": "The frontend does not know this connection (say, it restarted): say C_HELLO again."},
    {"name": "c_hello_future_version", "type": "C_HELLO",
     "header": [1, 2, {"model": "digits", "version": "1"}],
     "description": "A hello from a container speaking RPC version 2 (refused by a version-1 frontend)."},
    {"name": "f_reject", "type": "F_REJECT",
     "header": [4, "container RPC version 2 is not supported; this frontend speaks 1"],
     "description": "The frontend's answer to c_hello_future_version: the container must exit (code 2)."},
]


def to_value(v):
    """Tagged JSON -> a Python value for the encoders."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        if set(v) == {"$ndarray"}:
            s = v["$ndarray"]
            return np.array(s["values"], dtype=s["dtype"]).reshape(s["shape"])
        return {k: to_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_value(x) for x in v]
    return v


def payload_bytes(payload: dict) -> bytes:
    (kind, spec), = payload.items()
    if kind == "nd":
        arr = np.array(spec["values"], dtype=np.dtype(spec["dtype"]))
        assert arr.size == int(np.prod(spec["shape"]))
        return arr.tobytes()
    if kind == "vl":
        items = [to_value(x) for x in spec["items"]]
        data = [x.encode("utf-8") if spec["kind"] == "str" else x for x in items]
        offsets = [0]
        for d in data:
            offsets.append(offsets[-1] + len(d))
        return struct.pack(f"<{len(offsets)}Q", *offsets) + b"".join(data)
    if kind == "mp":
        return wire.pack(to_value(spec))
    if kind == "vla":  # arrays of one dtype, any shapes: offsets, dimensions, data
        arrays = [np.array(it["values"], dtype=np.dtype(spec["dtype"])).reshape(it["shape"]) for it in spec["items"]]
        offsets = [0]
        for a in arrays:
            offsets.append(offsets[-1] + a.nbytes)
        dims = [d for a in arrays for d in a.shape]
        return (struct.pack(f"<{len(offsets)}Q", *offsets) + struct.pack(f"<{len(dims)}Q", *dims)
                + b"".join(a.tobytes() for a in arrays))
    raise ValueError(kind)


def build() -> dict:
    out = []
    for v in VECTORS:
        kind = v["type"]
        header = v["header"]
        assert header[0] == TYPE_CODES[kind] and len(header) == 1 + len(FIELDS[kind]), v["name"]
        frames = [msgpack.packb(header, use_bin_type=True)]
        if "payload" in v:
            frames.append(payload_bytes(v["payload"]))
        out.append({
            "name": v["name"],
            "direction": C2F if kind.startswith("C_") else F2C,
            "type": kind,
            "type_code": TYPE_CODES[kind],
            "description": v["description"],
            "fields": dict(zip(FIELDS[kind], header[1:])),
            "header": header,
            "payload": v.get("payload"),
            "frames": [f.hex() for f in frames],
        })
    return {
        "rpc_version": 1,
        "format": "each vector is one message: the frames a container's DEALER sends or receives (no routing "
                  "identity), as hex. Frame 0 is the msgpack header (shortest int and length forms, str as "
                  "msgpack str, map keys in the order listed); frame 1, when present, is the payload described by "
                  "'payload'. A decoder must accept any valid msgpack form of the same header.",
        "field_order": {k: list(f) for k, f in FIELDS.items()},
        "vectors": out,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if vectors.json is not up to date")
    args = p.parse_args()
    text = render()
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} is out of date")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(VECTORS)} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
