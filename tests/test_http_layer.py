"""The one HTTP layer under the REST, admin and metrics ports: bounded heads, order, flow control,
connection limits, metrics off the loop, and the REST port's small rules (batch cap, 503s, no echoes)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from clipper import errors as E
from clipper.config import Limits
from clipper.metrics import _MetricsConnection
from clipper.protocol import wire
from clipper.server import http as H
from clipper.server.rest import RestConnection, RestServer, http_status
from conftest import WireConn
from test_timeouts import _blast, _non_reading_socket, closed_by, read_until_closed, wait_for


def _token(rf) -> str:
    return rf.fe.admin.token.path.read_text().strip()


def _cut_off_header_line(port: int, head: bytes) -> tuple[int, bytes]:
    """Stream an endless header line after ``head``; returns (bytes sent, the reply).

    After each 64 KiB the client gives the server a moment to answer (the kernel would
    otherwise take megabytes that the server never reads)."""
    import select

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        sock.sendall(head + b"X-Pad: ")
        sent, reply = 0, b""
        try:
            while sent < 64 * 1024 * 1024 and not reply:
                sock.sendall(b"a" * 65536)
                sent += 65536
                if select.select([sock], [], [], 0.5)[0]:
                    reply = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        try:
            reply = reply or sock.recv(65536)
        except ConnectionResetError:
            pass
    return sent, reply


@pytest.mark.parametrize("kind", ["rest", "keyed-rest", "metrics"])
def test_an_unfinished_header_line_is_cut_off_on_every_http_port(frontend_factory, kind):
    rf = frontend_factory(require_api_keys=kind == "keyed-rest")
    port = rf.fe.metrics_port if kind == "metrics" else rf.fe.rest_port
    sent, reply = _cut_off_header_line(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    assert b" 431 " in reply.split(b"\r\n")[0] and sent < 1024 * 1024, (sent, reply[:200])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # the port answers as before
        s.sendall(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n" if kind == "metrics" else
                  b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_until_closed(s).startswith(b"HTTP/1.1 200")


def test_heads_past_their_bounds_are_refused_and_close(frontend):
    rest, admin = frontend.fe.rest_port, frontend.fe.admin_port
    with socket.create_connection(("127.0.0.1", rest), timeout=30) as s:
        s.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 414") and b"LIMIT_EXCEEDED" in reply
    many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    with socket.create_connection(("127.0.0.1", admin), timeout=30) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n{many}\r\n".encode())
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 431") and b"Cache-Control: no-store" in reply


def test_nothing_is_parsed_after_a_closing_reply(frontend):
    port = frontend.fe.admin_port
    body = json.dumps({"name": "late", "input_dtype": "float32", "input_shape": [4]}).encode()
    register = (f"POST /api/v1/applications HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {_token(frontend)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        closing = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        s.sendall(closing + register)
        reply = read_until_closed(s)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 200")
    assert "late" not in frontend.call(lambda: set(frontend.fe.registry.applications))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # the control: it registers
        s.sendall(register.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        assert read_until_closed(s).startswith(b"HTTP/1.1 201")
    assert "late" in frontend.call(lambda: set(frontend.fe.registry.applications))


@pytest.mark.parametrize("kind", ["admin", "metrics"])
def test_admin_and_metrics_connection_limits(frontend_factory, kind):
    rf = frontend_factory(max_admin_connections=3, max_metrics_connections=3)
    srv = rf.fe.admin if kind == "admin" else rf.fe.metrics
    port = rf.fe.admin_port if kind == "admin" else rf.fe.metrics_port
    request = (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n" if kind == "admin"
               else "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").encode()
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    try:
        wait_for(lambda: rf.call(lambda: len(srv.connections)) == 3, what="three connections")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            reply = read_until_closed(s)
        assert reply.startswith(b"HTTP/1.1 503") and f"max_{kind}_connections is 3".encode() in reply
        held.pop().close()
        wait_for(lambda: rf.call(lambda: len(srv.connections)) == 2, what="a slot freed")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request)
            assert read_until_closed(s).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


# ------------------------------------------------------------------ metrics: cheap, off the loop
class _Gate:
    """A renderer that waits for the test to let it go (and says when it started)."""

    def __init__(self, render) -> None:
        self.render = render
        self.started = threading.Event()
        self.go = threading.Event()
        self.threads: set = set()

    def __call__(self, snap):
        self.threads.add(threading.get_ident())
        self.started.set()
        assert self.go.wait(60), "the test never released the renderer"
        return self.render(snap)


def _get_metrics(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    return s


def test_metrics_render_off_the_loop_and_concurrent_scrapes_share_one_rendering(frontend_factory):
    rf = frontend_factory(metrics_cache_ms=0)
    metrics = rf.fe.metrics
    gate = _Gate(metrics.render_snapshot)
    metrics.render_snapshot = gate
    first = _get_metrics(rf.fe.metrics_port)
    second = None
    c = WireConn(rf.port)
    try:
        assert gate.started.wait(30)
        for i in range(3):  # the loop answers while the rendering is in progress
            c.send(wire.ping(i))
            assert c.recv(1)[0][:2] == [wire.PONG, i]
        second = _get_metrics(rf.fe.metrics_port)  # joins the rendering in progress
        wait_for(lambda: rf.call(lambda: len(metrics._waiting)) == 2, what="the second scrape waiting")
        gate.go.set()
        for s in (first, second):
            reply = read_until_closed(s)
            assert reply.startswith(b"HTTP/1.1 200") and b"clipper_client_connections" in reply
    finally:
        gate.go.set()
        c.close()
        first.close()
        if second is not None:
            second.close()
    assert rf.call(lambda: metrics.renders) == 1
    assert threading.get_ident() not in gate.threads and rf.thread.ident not in gate.threads


def test_metrics_are_served_from_the_cached_rendering(frontend_factory):
    rf = frontend_factory(metrics_cache_ms=600_000)
    for _ in range(5):
        reply = read_until_closed(_get_metrics(rf.fe.metrics_port))
        assert reply.startswith(b"HTTP/1.1 200")
    assert rf.call(lambda: rf.fe.metrics.renders) == 1


def test_pipelined_scrapes_wait_in_bounded_numbers_and_are_answered_in_order(frontend_factory):
    # a cap on unread replies far above the burst (6000 answers of a few kB made at once)
    rf = frontend_factory(metrics_cache_ms=0, max_pipelined_requests=8, max_unread_reply_bytes=1 << 30)
    metrics = rf.fe.metrics
    gate = _Gate(metrics.render_snapshot)
    metrics.render_snapshot = gate
    n = 6000
    request = b"GET /metrics HTTP/1.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", rf.fe.metrics_port), timeout=30) as s:
        s.sendall(request * n + b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert gate.started.wait(30)

        def backlog():
            conns = list(metrics.connections)
            return conns and conns[0]._stash is not None and (len(conns[0].replies), len(conns[0]._stash))

        waiting, unparsed = wait_for(lambda: rf.call(backlog), what="reading paused with a backlog")
        assert waiting <= 8 + H._SLICE // len(request) + 1 and unparsed > 0
        gate.go.set()
        reply = read_until_closed(s, timeout=60)
    assert reply.count(b"HTTP/1.1 200 OK\r\n") == n and reply.count(b"HTTP/1.1 404 Not Found\r\n") == 1
    assert reply.rfind(b"HTTP/1.1 200 ") < reply.find(b"HTTP/1.1 404 ")  # in request order


def test_unread_pipelined_scrapes_cost_bounded_replies_and_pings_keep_answering(frontend_factory):
    rf = frontend_factory(max_write_buffer_bytes=64 * 1024, max_unread_reply_bytes=512 * 1024,
                          write_stall_timeout_ms=2000, max_pipelined_requests=64)
    peak = [0]

    class Counting(_MetricsConnection):
        def new_reply(self, reply=None):
            r = super().new_reply(reply)
            peak[0] = max(peak[0], len(self.replies))
            return r

    rf.call(lambda: setattr(rf.fe.metrics, "connection_class", Counting))
    request = b"GET /metrics HTTP/1.1\r\n\r\n"
    flood = _non_reading_socket(rf.fe.metrics_port)
    blaster = threading.Thread(target=_blast, args=(flood, request * 20_000), daemon=True)
    c = WireConn(rf.port)
    try:
        blaster.start()
        for i in range(50):
            c.send(wire.ping(i))
            assert c.recv(1)[0][:2] == [wire.PONG, i]
        blaster.join(60)
        wait_for(lambda: sum(closed_by(rf, "metrics").get(k, 0) for k in ("unread_replies", "write_stall")) == 1,
                 what="the flooding connection closed")
        c.send(wire.ping(99))
        assert c.recv(1)[0][:2] == [wire.PONG, 99]
    finally:
        c.close()
        flood.close()
    assert 0 < peak[0] <= 64 + H._SLICE // len(request) + 1, peak


# ------------------------------------------------------------------ the REST port's small rules
class _Transport:
    def __init__(self) -> None:
        self.out = b""
        self.closing = False

    def write(self, data) -> None:
        self.out += data

    def writelines(self, parts) -> None:
        self.out += b"".join(parts)

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name):
        return None


class _Processor:
    """Stands in for the query processor: one application "app"; predict fails or answers 1.0."""

    def __init__(self, exc=None) -> None:
        self.routes = {"app": SimpleNamespace(name="app", opaque=None)}
        self.exc = exc
        self.calls = 0

    def predict(self, reply, i, app, x, options) -> None:
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        reply.send_result(i, self.calls, 1.0, False, None)


def _rest(processor, body: bytes, path: bytes = b"/app/predict", **limits) -> bytes:
    loop = asyncio.new_event_loop()
    try:
        conn = RestConnection(RestServer(loop, processor, Limits(**limits), lambda: []))
        conn.connection_made(_Transport())
        conn.data_received(b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body))
        return conn.transport.out
    finally:
        loop.close()


def _answer(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_overloaded_is_503_with_retry_after_and_shutting_down_is_503():
    assert http_status(E.OverloadedError("x")) == 503 and http_status(E.ShuttingDownError("x")) == 503
    status, headers, body = _answer(_rest(_Processor(E.OverloadedError("the queue of m:1 is 80 ms deep")),
                                          b'{"input": [1]}'))
    assert status == 503 and headers["retry-after"] == "1" and body["error"]["code"] == E.OverloadedError.code
    status, headers, body = _answer(_rest(_Processor(E.ShuttingDownError("draining")), b'{"input": [1]}'))
    assert status == 503 and body["error"]["name"] == "SHUTTING_DOWN" and "retry-after" not in headers
    status, headers, _ = _answer(_rest(_Processor(), b'{"input": [1]}'))
    assert status == 200 and "retry-after" not in headers


def test_input_batch_is_capped_at_max_batch_items():
    proc = _Processor()
    status, _, body = _answer(_rest(proc, b'{"input_batch": [[1], [2], [3], [4]]}', max_batch_items=3))
    assert status == 400 and body["error"]["code"] == E.InvalidInputError.code
    assert "max_batch_items is 3" in body["error"]["message"] and proc.calls == 0
    status, _, body = _answer(_rest(proc, b'{"input_batch": [[1], [2], [3]]}', max_batch_items=3))
    assert status == 200 and len(body["batch_predictions"]) == 3


def test_errors_never_echo_unbounded_client_data():
    long = b"a" * 5000
    for path in (b"/" + long + b"/predict", b"/" + long, b"/x/" + long):
        status, _, body = _answer(_rest(_Processor(), b'{"input": [1]}', path=path))
        assert status in (404, 400) and len(body["error"]["message"]) < 400, (status, body)
    status, _, body = _answer(_rest(_Processor(), b"{" + long))
    assert status == 400 and len(body["error"]["message"]) < 400
    assert H.clip("x" * 500) == "x" * 100 + "...(cut)" and H.clip(b"ab") == "ab"


def _feed_rest(pieces: list[bytes], **limits) -> bytes:
    loop = asyncio.new_event_loop()
    try:
        conn = RestConnection(RestServer(loop, _Processor(), Limits(**limits), lambda: []))
        conn.connection_made(_Transport())
        for p in pieces:
            conn.data_received(p)
        return conn.transport.out
    finally:
        loop.close()


@pytest.mark.parametrize("split", ["whole", "head-then-body", "byte-by-byte"])
def test_a_head_of_exactly_max_header_bytes_passes_and_one_byte_more_does_not(split):
    body = b'{"input": [1]}'

    def request(head_len: int) -> bytes:
        head = b"POST /app/predict HTTP/1.1\r\nContent-Length: %d\r\nX-Pad: " % len(body)
        head += b"p" * (head_len - len(head) - 4) + b"\r\n\r\n"
        assert len(head) == head_len
        return head + body

    def pieces(data: bytes) -> list[bytes]:
        if split == "whole":
            return [data]
        if split == "head-then-body":
            return [data[:-len(body)], data[-len(body):]]
        return [data[i:i + 1] for i in range(len(data))]

    assert _answer(_feed_rest(pieces(request(256)), max_header_bytes=256))[0] == 200
    out = _feed_rest(pieces(request(258)), max_header_bytes=256)
    assert out.startswith(b"HTTP/1.1 431") and b"max_header_bytes=256" in out


def test_a_snapshot_of_many_applications_is_taken_in_slices():
    """A scrape holds the event loop for one slice of applications at a time, not for all of them."""
    from clipper.metrics import Histogram, snapshot, snapshot_steps

    def route(i):
        return SimpleNamespace(requests=i, answered=i, defaults=0, errors=0, cache_hits=0, partial=0,
                               low_confidence=0, feedback=0, latency=Histogram((0.1, 1.0)))

    fe = SimpleNamespace(processor=SimpleNamespace(routes={f"a{i}": route(i) for i in range(1000)}, queues={},
                                                   cache=None), manager=None, partial_budget=None)
    steps = snapshot_steps(fe, slice_len=256)
    turns = 0
    while True:
        try:
            next(steps)
            turns += 1
        except StopIteration as done:
            snap = done.value
            break
    assert turns == 1000 // 256 and [a[1] for a in snap["apps"]] == list(range(1000))
    assert snapshot(fe)["apps"] == snap["apps"]
