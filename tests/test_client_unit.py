"""The Python clients against a small real msgpack server run by the test.

The server (a uvloop or asyncio event loop in a background thread, port 0)
speaks the wire protocol for HELLO, PING, FEEDBACK and PREDICT, and its
PREDICT is scripted by the input so that each test can force the order and
kind of replies without sleeping:

* app ``"echo"``: the output is the input, except for these inputs
    * ``["after", n]``  the reply waits until ``n`` other replies were sent
      (this forces out-of-order replies deterministically);
    * ``"hold"``        no reply until a later ``"release"`` request;
    * ``"release"``     first sends every held reply, then its own;
    * ``"close"``       the server closes the connection;
    * ``"nil-error"``   ERROR with a nil id (as for an unreadable frame).
* app ``"fail"`` with input ``[code, message]``: ERROR with that code.
* app ``"default"``: the default output 0 with an explanation.
* any other app: ERROR UNKNOWN_APPLICATION.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import msgpack
import numpy as np
import pytest

import clipper.errors as E
from clipper._native import framing
from clipper.client import AsyncClient, Client, Prediction
from clipper.protocol import wire

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
WAIT_S = 10.0  # bound for waits on events that must happen promptly


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


def _server_default(obj):
    if isinstance(obj, np.ndarray):
        return wire.encode_ndarray(obj)
    raise TypeError(type(obj).__name__)


# --------------------------------------------------------------------- the server
class _ScriptedConnection(asyncio.Protocol):
    def __init__(self, server: "ScriptedServer") -> None:
        self.server = server
        self.reader = framing.FrameReader(16 * 1024 * 1024)
        self.unpack = wire.make_unpacker()
        self.packer = msgpack.Packer(default=_server_default, use_bin_type=True)
        self.transport = None
        self.sent = 0  # replies sent on this connection
        self.after: list[tuple[int, list]] = []  # (send when sent reaches, reply)
        self.held: list[list] = []  # replies waiting for "release"
        self.outstanding = 0  # requests received and not yet answered

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.append(self)

    def data_received(self, data) -> None:
        for body in self.reader.feed(data):
            if type(body) is int:
                self.reply(wire.error(None, E.FrameTooLargeError(f"frame of {body} bytes")))
                continue
            msg = self.unpack(body)
            self.server.received.append(msg)
            self.handle(msg)

    def handle(self, msg: list) -> None:
        kind, rid = msg[0], msg[1]
        srv = self.server
        if kind == wire.HELLO:
            offered = msg[2]["versions"]
            if srv.hello_version is not None:
                self.reply(wire.hello_ok(rid, srv.hello_version, "scripted", srv.limits))
            elif any(v in srv.versions for v in offered):
                self.reply(wire.hello_ok(rid, max(v for v in offered if v in srv.versions), "scripted",
                                         srv.limits))
            else:
                self.reply(wire.error(rid, E.UnsupportedVersionError(f"offered {offered}")))
            if srv.pause_after_hello:
                self.transport.pause_reading()
            return
        if kind == wire.PING:
            self.reply(wire.pong(rid))
            return
        if kind == wire.FEEDBACK:
            if msg[2] == "echo":
                opts = msg[5] if len(msg) > 5 else {}
                self.reply(wire.feedback_ok(rid, {"models": ["m:1"], "user": opts["user"]} if opts else None))
            else:
                self.reply(wire.error(rid, E.UnknownApplicationError(f"no application {msg[2]!r}")))
            return
        assert kind == wire.PREDICT, msg
        self.outstanding += 1
        srv.max_outstanding = max(srv.max_outstanding, self.outstanding)
        app, x = msg[2], msg[3]
        query_id = 1000 + rid
        if app == "echo":
            if isinstance(x, list) and len(x) == 2 and x[0] == "after":
                self.after.append((self.sent + x[1], wire.result(rid, query_id, x, False)))
            elif isinstance(x, str) and x == "hold":
                self.held.append(wire.result(rid, query_id, x, False))
                with srv.holds_changed:
                    srv.holds_seen += 1
                    srv.holds_changed.notify_all()
            elif isinstance(x, str) and x == "release":
                held, self.held = self.held, []
                for reply in held:
                    self.reply(reply)
                self.reply(wire.result(rid, query_id, x, False))
            elif isinstance(x, str) and x == "close":
                self.transport.close()
            elif isinstance(x, str) and x == "nil-error":
                self.reply(wire.error(None, E.MalformedFrameError("cannot read that frame")))
            else:
                self.reply(wire.result(rid, query_id, x, False))
        elif app == "default":
            self.reply(wire.result(rid, query_id, 0, True, {"explanation": "no model answered in time"}))
        elif app == "fail":
            code, message = x
            self.reply([wire.ERROR, rid, code, "WHATEVER", message])
        else:
            self.reply(wire.error(rid, E.UnknownApplicationError(f"no application named {app!r}")))

    def reply(self, msg: list) -> None:
        if self.transport.is_closing():
            return
        if msg[0] in (wire.RESULT, wire.ERROR) and msg[1] is not None:
            self.outstanding -= 1
        self.server.reply_order.append(msg[1])
        self.transport.write(framing.pack_frame(self.packer.pack(msg)))
        self.sent += 1
        due = [item for item in self.after if item[0] <= self.sent]
        if due:
            self.after = [item for item in self.after if item[0] > self.sent]
            for _, reply in due:
                self.reply(reply)


class ScriptedServer:
    """The scripted server in a background thread; ``port`` is set once it listens."""

    def __init__(self, loop_kind: str, *, versions=(1,), hello_version=None, limits=None,
                 pause_after_hello=False) -> None:
        self.loop_kind = loop_kind
        self.pause_after_hello = pause_after_hello  # stop reading until resume_reading()
        self.versions = tuple(versions)
        self.hello_version = hello_version  # answer HELLO with this version regardless
        self.limits = {"max_frame_bytes": 16 * 1024 * 1024, "max_pending_per_connection": 65536}
        self.limits.update(limits or {})
        self.port = None
        self.received: list = []
        self.reply_order: list = []
        self.connections: list[_ScriptedConnection] = []
        self.max_outstanding = 0
        self.holds_seen = 0  # "hold" requests received, on all connections
        self.holds_changed = threading.Condition()
        self.loop_errors: list = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-server", daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        assert self._ready.wait(WAIT_S), "the scripted server did not start"
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()
        assert not self.loop_errors, self.loop_errors

    def resume_reading(self) -> None:
        for conn in self.connections:
            self._loop.call_soon_threadsafe(conn.transport.resume_reading)

    def wait_holds(self, count: int) -> None:
        """Block until the server has received ``count`` "hold" requests."""
        with self.holds_changed:
            assert self.holds_changed.wait_for(lambda: self.holds_seen >= count, WAIT_S)

    def _run(self) -> None:
        loop = self._loop = _new_loop(self.loop_kind)
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        server = loop.run_until_complete(
            loop.create_server(lambda: _ScriptedConnection(self), "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for conn in self.connections:
                conn.transport.close()
            loop.run_until_complete(server.wait_closed())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()


@pytest.fixture(params=LOOPS)
def loop_kind(request):
    return request.param


@pytest.fixture
def server(loop_kind):
    with ScriptedServer(loop_kind) as srv:
        yield srv


def run_async(loop_kind: str, coro_fn):
    """Run ``coro_fn()`` on a fresh loop of ``loop_kind``; an exception the loop
    reports to its handler fails the test."""
    errors = []
    with asyncio.Runner(loop_factory=lambda: _new_loop(loop_kind)) as runner:
        runner.get_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        result = runner.run(asyncio.wait_for(coro_fn(), WAIT_S))
    assert not errors, errors
    return result


# --------------------------------------------------------------------- sync client
def test_connect_says_hello_and_reads_limits(server):
    with Client("127.0.0.1", server.port) as client:
        assert server.received[0][0] == wire.HELLO
        assert server.received[0][2]["versions"] == [1]
        assert client.server_info["version"] == 1
        assert client.server_info["limits"]["max_pending_per_connection"] == 65536
    assert client.closed


@pytest.mark.parametrize(
    "x",
    [
        3,
        2.5,
        "text",
        b"\x00\x01raw",
        [[1, 2.5], [3, 4]],
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([True, False]),
        np.zeros((0, 4), dtype=np.int16),
    ],
    ids=["int", "float", "str", "bytes", "list", "f4-array", "bool-array", "empty-array"],
)
def test_predict_echoes_each_input_kind(server, x):
    with Client("127.0.0.1", server.port) as client:
        p = client.predict("echo", x)
    assert isinstance(p, Prediction)
    assert p.is_default is False and p.explanation is None and p.extra == {}
    if isinstance(x, np.ndarray):
        assert isinstance(p.output, np.ndarray)
        assert p.output.dtype == x.dtype and p.output.shape == x.shape
        assert np.array_equal(p.output, x)
        assert not p.output.flags.writeable
    else:
        assert p.output == x


def test_predict_sends_options(server):
    with Client("127.0.0.1", server.port) as client:
        client.predict("echo", 1, options={"user": "alice"})
    assert server.received[-1][4] == {"user": "alice"}


def test_predict_many_matches_out_of_order_replies(server):
    xs = [["after", 3], "a", "b", "c", ["after", 1], "d", np.arange(3, dtype=np.int64)]
    with Client("127.0.0.1", server.port) as client:
        results = client.predict_many("echo", xs)
        predict_ids = [m[1] for m in server.received if m[0] == wire.PREDICT]
    sent_order = server.reply_order[-len(xs):]
    assert sent_order != predict_ids, "the server did not reorder; the test proves nothing"
    assert sorted(sent_order) == sorted(predict_ids)
    assert [type(r) for r in results] == [Prediction] * len(xs)
    for x, r in zip(xs[:-1], results[:-1]):
        assert r.output == x
    assert np.array_equal(results[-1].output, xs[-1])
    assert [r.query_id for r in results] == [1000 + rid for rid in predict_ids]


def test_predict_many_keeps_within_the_server_window(loop_kind):
    with ScriptedServer(loop_kind, limits={"max_pending_per_connection": 2}) as srv:
        with Client("127.0.0.1", srv.port) as client:
            xs = [["after", 1], "a", "b", ["after", 1], "c", "d", "e"]
            results = client.predict_many("echo", xs)
        assert [r.output for r in results] == xs
        assert srv.max_outstanding == 2


def test_predict_many_empty(server):
    with Client("127.0.0.1", server.port) as client:
        assert client.predict_many("echo", []) == []


ERROR_CASES = [
    (202, E.UnknownApplicationError, (LookupError,)),
    (203, E.DTypeMismatchError, (E.InvalidInputError, ValueError)),
    (204, E.ShapeMismatchError, (E.InvalidInputError, ValueError)),
    (205, E.InputTooLargeError, (ValueError,)),
    (105, E.LimitExceededError, (E.ProtocolError,)),
    (301, E.ModelError, (E.ServingError,)),
    (302, E.WrongOutputCountError, (E.ModelError,)),
    (304, E.DeadlineExceededError, (TimeoutError,)),
    (306, E.QueueFullError, (E.ServingError,)),
    (500, E.InternalError, ()),
    (299, E.RequestError, ()),  # unknown code: its hundreds decide the branch
    (399, E.ServingError, ()),
]


@pytest.mark.parametrize("code,cls,bases", ERROR_CASES, ids=[str(c[0]) for c in ERROR_CASES])
def test_server_errors_raise_their_class(server, code, cls, bases):
    with Client("127.0.0.1", server.port) as client:
        with pytest.raises(cls) as info:
            client.predict("fail", [code, f"message for {code}"])
        assert type(info.value) is cls
        assert isinstance(info.value, bases) if bases else True
        assert info.value.code == code
        assert info.value.message == f"message for {code}"
        assert client.ping() > 0  # the connection goes on


def test_predict_many_returns_errors_in_place(server):
    with Client("127.0.0.1", server.port) as client:
        out = client.predict_many("echo", ["a", ["after", 1], "b"])
        assert [p.output for p in out] == ["a", ["after", 1], "b"]
        mixed = client.predict_many("nope", [1, 2])
    assert all(isinstance(r, E.UnknownApplicationError) for r in mixed)


def test_default_result_carries_explanation(server):
    with Client("127.0.0.1", server.port) as client:
        p = client.predict("default", 1)
    assert p.is_default is True and p.output == 0
    assert p.explanation == "no model answered in time"
    assert p.extra == {"explanation": "no model answered in time"}


def test_feedback_and_ping(server):
    with Client("127.0.0.1", server.port) as client:
        assert client.feedback("echo", [1.0, 2.0], 3) == {}  # a FEEDBACK_OK without info
        assert client.feedback("echo", [1.0], 2, user="alice") == {"models": ["m:1"], "user": "alice"}
        assert server.received[-1][5] == {"user": "alice"}
        with pytest.raises(E.UnknownApplicationError):
            client.feedback("nope", [1.0], 0)
        rtt = client.ping()
    assert 0 < rtt < WAIT_S
    assert server.received[-2][:5] == [wire.FEEDBACK, server.received[-2][1], "nope", [1.0], 0]


def test_timeout_leaves_the_connection_usable(server):
    with Client("127.0.0.1", server.port, timeout=WAIT_S) as client:
        with pytest.raises(E.ClientTimeoutError):
            client.predict("echo", "hold", timeout=0.2)
        # "release" makes the server send the abandoned reply first: the
        # client must drop it and return the answer to this request.
        assert client.predict("echo", "release").output == "release"
        assert server.reply_order[-2] == server.received[-2][1]  # the late reply did come
        assert client.predict("echo", "after-timeout").output == "after-timeout"


def test_predict_many_timeout_fills_unanswered(server):
    with Client("127.0.0.1", server.port) as client:
        out = client.predict_many("echo", ["a", "hold", "b"], timeout=0.2)
        assert out[0].output == "a" and out[2].output == "b"
        assert isinstance(out[1], E.ClientTimeoutError)
        assert client.predict("echo", "release").output == "release"


def test_large_pipelined_arrays(server):
    xs = [np.full(16384, i, dtype=np.float32) for i in range(200)]  # 64 KiB each
    with Client("127.0.0.1", server.port) as client:
        out = client.predict_many("echo", xs)
    assert all(np.array_equal(p.output, x) for p, x in zip(out, xs))


def test_timeout_in_the_middle_of_a_frame_keeps_the_stream_whole(loop_kind):
    big = b"\x07" * (15 * 1024 * 1024)  # more than the socket buffers hold
    with ScriptedServer(loop_kind, pause_after_hello=True) as srv:
        with Client("127.0.0.1", srv.port) as client:
            with pytest.raises(E.ClientTimeoutError):
                client.predict("echo", big, timeout=0.3)
            assert len(client._out) > client._out_pos, "the frame was sent whole; the test proves nothing"
            srv.resume_reading()
            # The rest of the big frame goes first; its (late) echo is dropped.
            assert client.predict("echo", "next").output == "next"
        assert srv.received[-2][3] == big and srv.received[-1][3] == "next"


def test_server_close_fails_pending_calls(server):
    client = Client("127.0.0.1", server.port)
    out = client.predict_many("echo", ["hold", "a", "hold", "close"])
    assert out[1].output == "a"
    assert [type(r) for r in (out[0], out[2], out[3])] == [E.ConnectionClosedError] * 3
    assert client.closed
    with pytest.raises(E.ConnectionClosedError):
        client.predict("echo", 1)
    client.close()  # idempotent


def test_server_close_fails_single_predict(server):
    with Client("127.0.0.1", server.port) as client:
        with pytest.raises(E.ConnectionClosedError, match="closed the connection"):
            client.predict("echo", "close")
        with pytest.raises(E.ConnectionClosedError):
            client.ping()


def test_close_from_another_thread_wakes_a_waiting_call(server):
    client = Client("127.0.0.1", server.port, timeout=None)
    caught = []

    def call():
        try:
            client.predict("echo", "hold")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            caught.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    server.wait_holds(1)
    client.close()
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], E.ConnectionClosedError)


def test_nil_id_error_fails_the_request_in_flight(server):
    with Client("127.0.0.1", server.port) as client:
        with pytest.raises(E.MalformedFrameError, match="cannot read that frame"):
            client.predict("echo", "nil-error")
        assert client.predict("echo", 5).output == 5


def test_threads_share_one_client(server):
    with Client("127.0.0.1", server.port) as client:
        results: dict[int, list] = {}

        def worker(k: int) -> None:
            results[k] = [client.predict("echo", [k, i]).output for i in range(50)]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
    assert results == {k: [[k, i] for i in range(50)] for k in range(4)}


def test_oversized_request_is_refused_before_sending(loop_kind):
    with ScriptedServer(loop_kind, limits={"max_frame_bytes": 1000}) as srv:
        with Client("127.0.0.1", srv.port) as client:
            with pytest.raises(E.FrameTooLargeError, match="max_frame_bytes is 1000"):
                client.predict("echo", b"x" * 2000)
            assert client.predict("echo", b"y" * 10).output == b"y" * 10
        assert all(len(m) < 4 or m[3] != b"x" * 2000 for m in srv.received)


def test_unencodable_input_is_invalid_input(server):
    with Client("127.0.0.1", server.port) as client:
        with pytest.raises(E.InvalidInputError) as info:
            client.predict("echo", np.zeros(3, dtype=np.complex64))
        assert isinstance(info.value, ValueError)
        with pytest.raises(E.InvalidInputError, match="index 1"):
            client.predict_many("echo", [1, object()])
        assert client.predict("echo", 1).output == 1


def test_bad_arguments(server):
    with Client("127.0.0.1", server.port) as client:
        with pytest.raises(TypeError):
            client.predict(b"echo", 1)
        with pytest.raises(ValueError):
            client.predict("echo", 1, timeout=-1)
        with pytest.raises(TypeError):
            client.predict("echo", 1, options=[("user", "x")])


def test_unsupported_version(loop_kind):
    with ScriptedServer(loop_kind, versions=(2,)) as srv:
        with pytest.raises(E.UnsupportedVersionError):
            Client("127.0.0.1", srv.port)
        with pytest.raises(E.UnsupportedVersionError):
            run_async(loop_kind, lambda: AsyncClient.connect("127.0.0.1", srv.port))


def test_server_choosing_a_version_not_offered(loop_kind):
    with ScriptedServer(loop_kind, hello_version=7) as srv:
        with pytest.raises(E.UnsupportedVersionError, match="version 7"):
            Client("127.0.0.1", srv.port)
        with pytest.raises(E.UnsupportedVersionError, match="version 7"):
            run_async(loop_kind, lambda: AsyncClient.connect("127.0.0.1", srv.port))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused():
    with pytest.raises(ConnectionRefusedError):
        Client("127.0.0.1", _closed_port())


# --------------------------------------------------------------------- async client
def test_async_concurrent_predicts_out_of_order(server, loop_kind):
    xs = [["after", 4], "a", ["after", 1], "b", "c", "d", np.ones((2, 2), dtype=np.float64)]

    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.port) as client:
            return await asyncio.gather(*(client.predict("echo", x) for x in xs))

    results = run_async(loop_kind, main)
    predict_ids = [m[1] for m in server.received if m[0] == wire.PREDICT]
    assert server.reply_order[-len(xs):] != predict_ids
    for x, r in zip(xs[:-1], results[:-1]):
        assert r.output == x
    assert np.array_equal(results[-1].output, xs[-1]) and results[-1].output.dtype == np.float64


def test_async_predict_many_and_errors(server, loop_kind):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.port) as client:
            many = await client.predict_many("echo", [["after", 2], "x", "y", ["after", 1], "z"])
            errs = await client.predict_many("fail", [[203, "dtype"], [301, "boom"]])
            with pytest.raises(E.ShapeMismatchError, match="bad shape"):
                await client.predict("fail", [204, "bad shape"])
            default = await client.predict("default", 1)
            await client.feedback("echo", [1, 2], 1)
            rtt = await client.ping()
            return many, errs, default, rtt

    many, errs, default, rtt = run_async(loop_kind, main)
    assert [p.output for p in many] == [["after", 2], "x", "y", ["after", 1], "z"]
    assert [type(e) for e in errs] == [E.DTypeMismatchError, E.ModelError]
    assert errs[1].message == "boom"
    assert default.is_default and default.explanation == "no model answered in time"
    assert rtt > 0


def test_async_predict_many_window(loop_kind):
    with ScriptedServer(loop_kind, limits={"max_pending_per_connection": 3}) as srv:
        xs = [["after", 2], "a", "b", "c", ["after", 1], "d", "e", "f", "g"]

        async def main():
            async with await AsyncClient.connect("127.0.0.1", srv.port) as client:
                return await client.predict_many("echo", xs)

        assert [p.output for p in run_async(loop_kind, main)] == xs
        assert srv.max_outstanding <= 3


def test_async_timeout_and_cancel_leave_the_connection_usable(server, loop_kind):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.port) as client:
            with pytest.raises(E.ClientTimeoutError):
                await client.predict("echo", "hold", timeout=0.2)
            task = asyncio.ensure_future(client.predict("echo", "hold"))
            await asyncio.to_thread(server.wait_holds, 2)  # the server holds both requests
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client._proto.pending == {}
            # Both late replies arrive before this one; both are dropped.
            p = await client.predict("echo", "release")
            assert p.output == "release"
            many = await client.predict_many("echo", ["a", "hold", "b"], timeout=0.2)
            assert isinstance(many[1], E.ClientTimeoutError)
            assert (await client.predict("echo", "release")).output == "release"

    run_async(loop_kind, main)


def test_async_large_pipelined_arrays(server, loop_kind):
    xs = [np.full(16384, i, dtype=np.float32) for i in range(200)]  # 64 KiB each

    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.port) as client:
            many = await client.predict_many("echo", xs)
            each = await asyncio.gather(*(client.predict("echo", x) for x in xs))
            return many, each

    many, each = run_async(loop_kind, main)
    assert all(np.array_equal(p.output, x) for p, x in zip(many, xs))
    assert all(np.array_equal(p.output, x) for p, x in zip(each, xs))


def test_async_connection_drop_fails_every_pending_call(server, loop_kind):
    async def main():
        client = await AsyncClient.connect("127.0.0.1", server.port)
        holds = [asyncio.ensure_future(client.predict("echo", "hold")) for _ in range(3)]
        results = await asyncio.gather(*holds, client.predict("echo", "close"), return_exceptions=True)
        assert [type(r) for r in results] == [E.ConnectionClosedError] * 4
        assert client.closed
        with pytest.raises(E.ConnectionClosedError):
            await client.predict("echo", 1)
        await client.close()

    run_async(loop_kind, main)


def test_async_close_fails_pending_calls(server, loop_kind):
    async def main():
        client = await AsyncClient.connect("127.0.0.1", server.port)
        hold = asyncio.ensure_future(client.predict("echo", "hold"))
        await asyncio.sleep(0)
        await client.close()
        with pytest.raises(E.ConnectionClosedError, match="closed by the client"):
            await hold
        with pytest.raises(E.ConnectionClosedError):
            await client.ping()

    run_async(loop_kind, main)


def test_async_nil_id_error(server, loop_kind):
    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.port) as client:
            with pytest.raises(E.MalformedFrameError):
                await client.predict("echo", "nil-error")
            assert (await client.predict("echo", 3)).output == 3

    run_async(loop_kind, main)


def test_async_connection_refused(loop_kind):
    with pytest.raises(ConnectionRefusedError):
        run_async(loop_kind, lambda: AsyncClient.connect("127.0.0.1", _closed_port()))
