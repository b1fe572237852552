"""The container RPC's test vectors (tests/vectors/container/, docs/container-protocol.md).

Both ends of the Python implementation are held to the same bytes: the
frontend's :class:`~clipper.rpc.server.ContainerServer` and the SDK's
:class:`~clipper.container.runtime.ContainerRuntime` each talk to a raw
ZeroMQ socket of the test that sends the vectors' frames and compares every
frame it gets with them. A change to either end's encoding, or to the spec's
constants, fails here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import queue
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import uvloop
import zmq

from clipper.container import runtime as rt_mod
from clipper.errors import ModelError
from clipper.protocol import wire
from clipper.rpc import messages as m
from clipper.rpc import server as server_mod
from clipper.rpc.server import ContainerServer, parse_hello
from clipper.security.container_keys import ContainerCredentials

HERE = Path(__file__).resolve().parent
VECTORS_DIR = HERE / "vectors" / "container"
DOC = json.loads((VECTORS_DIR / "vectors.json").read_text(encoding="utf-8"))
V = {v["name"]: v for v in DOC["vectors"]}
SPEC = (HERE.parent / "docs" / "container-protocol.md").read_text(encoding="utf-8")


def frames(name: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in V[name]["frames"]]


def _generator():
    spec = importlib.util.spec_from_file_location("make_container_vectors", VECTORS_DIR / "make_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


GEN = _generator()  # the vectors' own generator: its to_value reads the tagged JSON the same way
to_value = GEN.to_value


def same(a, b) -> bool:
    """Deep equality with types (arrays by dtype, shape and bytes)."""
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(b, dict):
        return type(a) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return type(a) is list and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def payload_value(name: str):
    """What a vector's payload frame decodes to, per the spec (an array, or a list of items)."""
    (kind, spec), = V[name]["payload"].items()
    if kind == "nd":
        return np.array(spec["values"], dtype=spec["dtype"]).reshape(spec["shape"])
    if kind == "vl":
        return [to_value(x) for x in spec["items"]]
    if kind == "vla":
        return [np.array(it["values"], dtype=spec["dtype"]).reshape(it["shape"]) for it in spec["items"]]
    return to_value(spec)


# ---------------------------------------------------------------- the vectors themselves


def test_generator_is_deterministic_and_up_to_date():
    gen = GEN
    assert gen.render() == gen.render()
    assert gen.render() == (VECTORS_DIR / "vectors.json").read_text(encoding="utf-8"), \
        "run `python tests/vectors/container/make_vectors.py` and commit the result"


@pytest.mark.parametrize("name", list(V))
def test_each_vector_decodes_to_what_it_describes(name):
    v = V[name]
    fs = frames(name)
    header = msgpack.unpackb(fs[0], raw=False)
    assert header == v["header"] and header[0] == v["type_code"]
    assert v["type_code"] == getattr(m, v["type"])
    assert v["direction"] == ("container->frontend" if v["type"].startswith("C_") else "frontend->container")
    assert [v["type_code"], *v["fields"].values()] == header
    assert list(v["fields"]) == DOC["field_order"][v["type"]]
    assert len(fs) == (2 if v["payload"] is not None else 1)
    if v["payload"] is None:
        return
    count, encoding, meta = header[2], header[3], header[4]
    expected = payload_value(name)
    if encoding == m.ENC_NDARRAY:
        arr = np.frombuffer(fs[1], dtype=wire.ALLOWED_DTYPES[meta[0]]).reshape(meta[1])
        assert meta[1][0] == count and same(arr, expected)
    elif encoding == m.ENC_VARLEN and meta[0] == "array":
        got = rt_mod.split_arrays(fs[1], count, meta[1], meta[2])
        assert len(got) == count and all(same(a, b) for a, b in zip(got, expected, strict=True))
        offsets = np.frombuffer(fs[1], "<u8", count + 1)
        assert offsets[0] == 0 and len(fs[1]) == 8 * (count + 1 + count * meta[2]) + int(offsets[-1])
    elif encoding == m.ENC_VARLEN:
        assert rt_mod.split_varlen(fs[1], count, meta[0] == "str") == expected
        offsets = np.frombuffer(fs[1], "<u8", count + 1)
        assert offsets[0] == 0 and len(fs[1]) == 8 * (count + 1) + int(offsets[-1])
    else:
        assert encoding == m.ENC_MSGPACK and meta is None
        decoded = wire.make_unpacker()(fs[1])
        assert len(decoded) == count
        assert same([np.array(x) if isinstance(x, np.ndarray) else x for x in decoded], expected)


def test_the_spec_states_the_code_s_constants():
    """docs/container-protocol.md gives each type code, exit code and the version as in clipper/rpc/messages.py."""
    names = [n for n in dir(m) if re.match(r"^(C_|F_|EXIT_)[A-Z_]+$", n)] + ["RPC_VERSION"]
    assert len(names) == 15
    for name in names:
        assert re.search(rf"\|\s*`{name}`\s*\|\s*{getattr(m, name)}\s*\|", SPEC), f"{name} = {getattr(m, name)}"
    for name in ("MAX_HEADER_BYTES", "MAX_SHAPE_DIMS", "MAX_ERROR_MESSAGE_CHARS"):
        assert f"{getattr(server_mod, name)}" in SPEC and name in SPEC, name
    for v in DOC["vectors"]:
        assert f"`{v['name']}`" in SPEC, f"the spec does not mention vector {v['name']}"


# ---------------------------------------------------------------- the frontend's end


class _Queue:
    """A model queue that records what the server hands it."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def add_replica(self, replica) -> None:
        self.events.put(("add", replica))

    def remove_replica(self, replica, reason) -> None:
        self.events.put(("remove", replica, reason))

    def deliver(self, replica, batch, outputs) -> None:
        replica.batch = None
        self.events.put(("deliver", batch.batch_id, outputs))

    def fail_batch(self, replica, batch, exc) -> None:
        replica.batch = None
        self.events.put(("fail", batch.batch_id, exc))

    def next(self):
        return self.events.get(timeout=10)


class _Dealer:
    """A container's socket, by hand."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, fs: list[bytes]) -> None:
        self.sock.send_multipart(fs)

    def recv(self, timeout_ms: int = 10_000) -> list[bytes]:
        """The next message that is not a heartbeat (each heartbeat checked against its vector)."""
        while True:
            assert self.sock.poll(timeout_ms), "no message from the frontend"
            got = self.sock.recv_multipart()
            if got != frames("f_heartbeat"):
                return got


@pytest.fixture
def rpc_server():
    """A real ContainerServer (rpc_security "none": no keyring) on a uvloop loop in a thread."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    q = _Queue()
    mv = SimpleNamespace(key="digits:1", input_dtype="float32", input_shape=[4])

    def resolve(model, version):
        if (model, version) != ("digits", "1"):
            raise server_mod.ClipperError(f"model {model}:{version} is not deployed")
        return q, mv

    def on_loop(fn):
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    srv = on_loop(lambda: ContainerServer(loop, "tcp://127.0.0.1:0", resolve, heartbeat_interval_ms=1000,
                                          heartbeat_timeout_ms=5000, batch_timeout_ms=30_000))
    on_loop(srv.start)
    ctx = zmq.Context()
    yield SimpleNamespace(srv=srv, queue=q, on_loop=on_loop, dealer=lambda: _Dealer(ctx, srv.endpoint))
    on_loop(srv.close)
    ctx.destroy(linger=0)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _batch(batch_id: int, inputs: list):
    return SimpleNamespace(batch_id=batch_id, queries=[SimpleNamespace(input=x) for x in inputs])


def test_the_frontend_speaks_the_vectors(rpc_server):
    s = rpc_server
    c = s.dealer()
    # hello -> welcome (replica id 1, the intervals configured), and the hello parses as the spec says
    hello = msgpack.unpackb(frames("c_hello")[0])
    info = parse_hello(hello)
    assert info["input_shape"] == (4,) and info["pid"] == 4242 and info["credential_id"] == "0123456789abcdef"
    c.send(frames("c_hello"))
    assert c.recv() == frames("f_welcome")
    event, replica = s.queue.next()
    assert event == "add" and replica.claimed_pid == 4242 and replica.sdk == "clipper-container/0.1"

    def round_trip(batch_in: str, inputs: list, answer: str, variable: bool = False):
        batch = _batch(V[batch_in]["fields"]["batch_id"], inputs)

        def send():
            replica.batch = batch
            replica.variable = variable  # as for a model deployed with a free dimension (input shape [-1])
            s.srv.send_batch(replica, batch)
        s.on_loop(send)
        assert c.recv() == frames(batch_in), batch_in
        c.send(frames(answer))
        return s.queue.next()

    x = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    assert round_trip("f_batch_nd_f4", [x[0], x[1]], "c_result_nd_f8") == ("deliver", 7, [10.0, 26.0])
    event, batch_id, exc = round_trip("f_batch_vl_str", ["h\u00e9llo", "", "ab"], "c_error")
    assert (event, batch_id, type(exc), exc.code) == ("fail", 8, ModelError, 301)
    assert exc.message == "model digits:1: ValueError: cannot classify an empty string"
    event, batch_id, outputs = round_trip("f_batch_vl_bytes", [b"\x00\xff", b"png"], "c_result_nd_2d")
    assert (event, batch_id) == ("deliver", 9)
    assert same(list(outputs), list(payload_value("c_result_nd_2d")))
    mp_inputs = [np.array([0.5, 1.5], np.float32), np.array([1, 2, 3], np.float32)]
    assert round_trip("f_batch_vl_array", mp_inputs, "c_result_mp", variable=True) == (
        "deliver", 10, ["cat", {"p": 0.25, "label": 3}])

    # heartbeats: the frontend's, and the container's counts as being heard
    seen = s.on_loop(lambda: replica.last_seen_ns)
    s.on_loop(s.srv._heartbeat)
    assert c.sock.poll(10_000) and c.sock.recv_multipart() == frames("f_heartbeat")
    c.send(frames("c_heartbeat"))
    deadline = 100
    while s.on_loop(lambda: replica.last_seen_ns) == seen and deadline:
        c.sock.poll(20)
        deadline -= 1
    assert deadline, "the container's heartbeat was not heard"

    # a connection the frontend does not know is asked to say hello again
    stranger = s.dealer()
    stranger.send(frames("c_heartbeat"))
    assert stranger.recv() == frames("f_rehello")
    # a hello of another RPC version is refused with the vector's message, and changes nothing
    stranger.send(frames("c_hello_future_version"))
    assert stranger.recv() == frames("f_reject")
    assert s.on_loop(lambda: s.srv.count("digits:1")) == 1
    # bye: dropped at once
    c.send(frames("c_bye"))
    assert s.queue.next()[:2] == ("remove", replica)
    assert s.on_loop(lambda: s.srv.count("digits:1")) == 0


# ---------------------------------------------------------------- the container's end


class _Os:
    """``os`` for the runtime, with the vectors' pid."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def getpid() -> int:
        return 4242


@pytest.fixture
def router():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    ctx.destroy(linger=0)


def _recv(sock, timeout_ms: int = 10_000, heartbeats: bool = False) -> list[bytes]:
    """[ident, frames...]: the next message (skipping heartbeats, each checked, unless asked for one)."""
    while True:
        assert sock.poll(timeout_ms), "no message from the container"
        got = sock.recv_multipart()
        if got[1:] == frames("c_heartbeat") and not heartbeats:
            continue
        return got


def _start_runtime(router, monkeypatch, predict):
    monkeypatch.setattr(rt_mod, "os", _Os())
    monkeypatch.setattr(rt_mod, "rss_bytes", lambda: 104857600)  # the vector's figures, not this process's
    creds = ContainerCredentials("0123456789abcdef", "digits", "1", "none")
    rt = rt_mod.ContainerRuntime(predict, "digits", "1", router.getsockopt_string(zmq.LAST_ENDPOINT),
                                 input_dtype="float32", input_shape=[4], credentials=creds, load_ms=12.5)
    result: list = []
    t = threading.Thread(target=lambda: result.append(rt.run()), daemon=True)
    t.start()
    return rt, t, result


def test_the_container_sdk_speaks_the_vectors(router, monkeypatch):
    seen = []

    def predict(batch):
        seen.append(batch)
        if isinstance(batch, np.ndarray):
            return batch.astype(np.float64).sum(axis=1)
        if batch and isinstance(batch[0], str) and "" in batch:
            raise ValueError("cannot classify an empty string")
        if batch and isinstance(batch[0], bytes):
            return np.array([[len(b), b[0], b[-1]] for b in batch], np.float32)
        return ["cat", {"p": 0.25, "label": 3}]

    rt, thread, result = _start_runtime(router, monkeypatch, predict)
    try:
        ident, *hello = _recv(router)
        assert hello == frames("c_hello")
        router.send_multipart([ident, *frames("f_welcome")])
        for batch, answer in (("f_batch_nd_f4", "c_result_nd_f8"), ("f_batch_vl_str", "c_error"),
                              ("f_batch_vl_bytes", "c_result_nd_2d"), ("f_batch_vl_array", "c_result_mp")):
            router.send_multipart([ident, *frames(batch)])
            assert _recv(router)[1:] == frames(answer), batch
        assert same(seen[0], payload_value("f_batch_nd_f4"))
        assert seen[1] == ["h\u00e9llo", "", "ab"] and seen[2] == [b"\x00\xff", b"png"]
        assert all(same(np.array(a), b) for a, b in zip(seen[3], payload_value("f_batch_vl_array"), strict=True))
        assert rt.heartbeat_interval == 1.0 and rt._links[0].timeout == 5.0 and rt.replica_id == 1
        # its own heartbeat, once an interval has passed since it connected
        assert _recv(router, 3000, heartbeats=True)[1:] == frames("c_heartbeat")
        router.send_multipart([ident, *frames("f_heartbeat")])
        # F_REHELLO: it says hello again (the SDK on a new connection)
        router.send_multipart([ident, *frames("f_rehello")])
        ident2, *hello = _recv(router)
        assert hello == frames("c_hello") and ident2 != ident
        rt.stop()  # as on SIGTERM: it says goodbye
        assert _recv(router)[1:] == frames("c_bye")
        thread.join(10)
        assert result == [m.EXIT_OK]
    finally:
        rt.stop()
        thread.join(10)


@pytest.mark.parametrize("opts", [{"heartbeat_interval_ms": 0, "heartbeat_timeout_ms": "x"},
                                  {"heartbeat_interval_ms": True, "heartbeat_timeout_ms": 10**12}, "not a map"])
def test_the_container_sdk_keeps_its_defaults_for_a_welcome_out_of_bounds(router, monkeypatch, opts):
    # a welcome asking for a beat every 0 ms (a busy loop), or naming no times it can use: the defaults
    rt, thread, result = _start_runtime(router, monkeypatch, lambda batch: batch)
    try:
        ident, *hello = _recv(router)
        assert hello == frames("c_hello")
        router.send_multipart([ident, msgpack.packb([m.F_WELCOME, 1, opts])])
        router.send_multipart([ident, *frames("f_batch_nd_f4")])  # answered: the welcome was taken
        assert _recv(router)[1:]
        assert rt._links[0].interval == 1.0 and rt._links[0].timeout == 5.0 and rt.replica_id == 1
    finally:
        rt.stop()
        thread.join(10)


def test_the_container_sdk_survives_any_frontend_message(router, monkeypatch):
    # Malformed headers are ignored; a batch whose header names a usable id, or whose payload does not match
    # its header, is answered with C_ERROR; the container goes on serving either way. (Each of these killed
    # the container's loop before: FormatError, TypeError, IndexError, ValueError out of run().)
    seen = []
    rt, thread, result = _start_runtime(router, monkeypatch, lambda batch: seen.append(batch) or [0.0] * len(batch))
    try:
        ident, *hello = _recv(router)
        router.send_multipart([ident, *frames("f_welcome")])
        pack = msgpack.packb
        payload = np.zeros(4, np.float32).tobytes()
        ignored = [[b"\xc1"], [pack(5)], [pack([])], [pack({1: 2})], [pack([m.F_WELCOME])],
                   [pack([m.F_WELCOME, "one"])], [pack([m.F_REJECT])], [pack([m.F_REJECT, 5])],
                   [pack([m.F_BATCH, "x", 1, "nd", ["<f4", [1, 4]]]), payload],  # no usable id: nothing to answer
                   [pack([m.F_BATCH, 1, 1, "nd", ["<f4", [1, 4]]]) + b"\x00" * (64 * 1024), payload]]
        answered = {  # batch id -> what its C_ERROR says
            7: [pack([m.F_BATCH, 7, 1, "nd"]), payload],  # four fields
            8: [pack([m.F_BATCH, 8, 1, "nd", ["<f4", [1, 4]]])],  # no payload frame
            9: [pack([m.F_BATCH, 9, 1, "nd", ["<f4", [1000, 2]]]), bytes(8000)],  # 1000 rows for a count of 1
            10: [pack([m.F_BATCH, 10, 1, "mp", None]), pack({"a": 1})],  # not a list of one item
            11: [pack([m.F_BATCH, 11, 1, "zz", None]), payload],  # no such encoding
            12: [pack([m.F_BATCH, 12, True, "nd", ["<f4", [1, 4]]]), payload],  # a count that is a bool
        }
        for msg in ignored:
            router.send_multipart([ident, *msg])
        for msg in answered.values():
            router.send_multipart([ident, *msg])
        errors = {}
        for _ in answered:
            head = msgpack.unpackb(_recv(router)[1])
            assert head[0] == m.C_ERROR, head
            errors[head[1]] = head[3]
        assert sorted(errors) == sorted(answered) and not seen
        assert "1000" in errors[9] and "holds a dict" in errors[10] and "zz" in errors[11]
        router.send_multipart([ident, *frames("f_batch_nd_f4")])  # and it still serves
        head = msgpack.unpackb(_recv(router)[1])
        assert head[0] == m.C_RESULT and head[2] == 2 and len(seen) == 1
        assert thread.is_alive() and not result
    finally:
        rt.stop()
        thread.join(10)


def test_the_container_sdk_exits_on_f_reject(router, monkeypatch, capfd):
    rt, thread, result = _start_runtime(router, monkeypatch, lambda batch: batch)
    try:
        ident, *hello = _recv(router)
        assert hello == frames("c_hello")
        router.send_multipart([ident, *frames("f_reject")])
        thread.join(10)
        assert result == [m.EXIT_REJECTED]
        assert "container RPC version 2 is not supported" in capfd.readouterr().err
    finally:
        rt.stop()
        thread.join(10)
