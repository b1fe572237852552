"""Issue 10's behaviour under overload and abusive clients, as tests.

Admission control, graceful drain, byte budgets, timeouts on every port and
bounded replies. (Written before the features landed, as strict xfail tests
that failed at the assertion stating each feature; the marks went when they
passed.) Nothing here asserts a tight timing: "at arrival" means well before
the deadline, "closed" means within a few seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import WireConn

from clipper._native import framing
from clipper.management.registry import Application, ModelVersion
from clipper.protocol import wire

pytestmark = pytest.mark.timeout(90)

OVERLOADED = 309
QUEUE_FULL = 306
SHUTTING_DOWN = 310


def deploy(fe, app: str, fn: str, *, slo_ms: float, on_overload: str | None = None, max_batch: int = 8,
           batching: str = "aimd", env: dict | None = None, shape=(4,)) -> ModelVersion:
    """Like RunningFrontend.deploy, with the application's ``on_overload``."""
    fe.call(fe.fe.register_application(Application(app, "float32", shape, slo_ms=slo_ms, default_output=-1.0,
                                                   cache=False, on_overload=on_overload)))
    mv = ModelVersion(f"{app}-model", "1", "float32", shape, entry=f"model_zoo.py:{fn}", max_batch=max_batch,
                      batching=batching, env=dict(env or {}))
    fe.call(fe.fe.deploy_model(mv))
    fe.call(fe.fe.link(app, mv.name))
    fe.call(fe.fe.wait_ready(mv.name, "1", timeout_s=60))
    return mv


def burst(port: int, app: str, x, n: int, timeout: float = 30.0) -> list[tuple[float, list]]:
    """``n`` PREDICTs written at once on one connection; returns (latency s, reply) per request, by id."""
    c = WireConn(port)
    try:
        frames = b"".join(framing.pack_frame(wire.pack(wire.predict(i, app, x))) for i in range(n))
        t0 = time.monotonic()
        c.send_raw(frames)
        out: dict[int, tuple[float, list]] = {}
        deadline = t0 + timeout
        while len(out) < n:
            (msg,) = c.recv(1, timeout=max(0.1, deadline - time.monotonic()))
            out[msg[1]] = (time.monotonic() - t0, msg)
        return [out[i] for i in range(n)]
    finally:
        c.close()


def _x(first: float) -> np.ndarray:
    return np.array([first, 0.0, 0.0, 0.0], dtype=np.float32)


def _warm(fe, app: str, x) -> None:
    """One query answered first, so the model's batch latency has been measured."""
    for lat, msg in burst(fe.port, app, x, 2):
        assert msg[0] == wire.RESULT, msg


# ------------------------------------------------------------------ admission control
def test_overload_is_refused_at_arrival(frontend_factory):
    fe = frontend_factory()
    slo_ms = 300.0
    deploy(fe, "adm", "sleep_by_input", slo_ms=slo_ms, on_overload="error", max_batch=1, batching="fixed")
    x = _x(0.1)  # 100 ms per query, one at a time: 300 queries need 30 s, the SLO allows 0.3 s
    _warm(fe, "adm", x)
    replies = burst(fe.port, "adm", x, 300)
    codes = [m[2] for _, m in replies if m[0] == wire.ERROR]
    assert QUEUE_FULL not in codes
    refused = [lat for lat, m in replies if m[0] == wire.ERROR and m[2] == OVERLOADED]
    assert len(refused) >= 250, f"{len(refused)} of 300 refused with OVERLOADED; replies {codes[:5]}"
    # Refused at arrival: long before the deadline at which a default would come.
    assert max(refused) < slo_ms / 1000 / 2, f"the slowest refusal came after {max(refused):.3f} s"
    admitted = [lat for lat, m in replies if m[0] == wire.RESULT and not m[4]]
    assert admitted and max(admitted) < slo_ms / 1000 + 0.5


@pytest.mark.parametrize("hold", [0.0, 0.5])
def test_overload_default_is_answered_at_once_or_held_within_the_slo(frontend_factory, hold):
    # default_refusal_hold = 0 (the default): a refused query's default comes at once. 0.5: half the SLO
    # after it was sent (none sooner, bar the timer's millisecond), every one within the SLO.
    fe = frontend_factory(default_refusal_hold=hold)
    slo_ms = 300.0
    deploy(fe, "admd", "sleep_by_input", slo_ms=slo_ms, on_overload="default", max_batch=1, batching="fixed")
    x = _x(0.1)
    _warm(fe, "admd", x)
    replies = burst(fe.port, "admd", x, 300)
    defaults = [lat for lat, m in replies if m[0] == wire.RESULT and m[4]]
    assert len(defaults) >= 250, f"{len(defaults)} of 300 got the default"
    if hold:
        assert min(defaults) >= hold * slo_ms / 1000 - 0.002, f"a default came after {min(defaults):.3f} s"
        assert max(defaults) < slo_ms / 1000, f"the slowest default came after {max(defaults):.3f} s"
    else:
        fast = [lat for lat in defaults if lat < slo_ms / 1000 / 2]
        assert len(fast) >= 250, f"{len(fast)} of 300 got the default before half the SLO"
    # the latency histogram counts them when they were answered
    buckets = fe.call(lambda: fe.fe.processor.routes["admd"].latency.counts)
    first_bucket = buckets[0]
    assert (first_bucket >= len(defaults)) if not hold else (first_bucket < 5), buckets


def test_admission_control_off_admits_everything(frontend_factory):
    fe = frontend_factory(admission_control=False)
    deploy(fe, "adm-off", "sleep_by_input", slo_ms=200.0, on_overload="error", max_batch=1, batching="fixed")
    x = _x(0.05)
    _warm(fe, "adm-off", x)
    replies = burst(fe.port, "adm-off", x, 100)
    assert all(m[0] == wire.RESULT for _, m in replies), [m for _, m in replies if m[0] != wire.RESULT][:3]
    assert any(m[4] for _, m in replies)  # the excess timed out into defaults: nothing refused it


def test_rest_overload_is_503_with_retry_after(frontend_factory):
    fe = frontend_factory()
    deploy(fe, "adm-rest", "sleep_by_input", slo_ms=300.0, on_overload="error", max_batch=1, batching="fixed")
    x = _x(0.1)
    _warm(fe, "adm-rest", x)
    c = WireConn(fe.port)  # a queue no model can serve within the SLO
    c.send_raw(b"".join(framing.pack_frame(wire.pack(wire.predict(i, "adm-rest", x))) for i in range(200)))
    try:
        h = http.client.HTTPConnection("127.0.0.1", fe.fe.rest_port, timeout=10)
        h.request("POST", "/adm-rest/predict", json.dumps({"input": x.tolist()}), {"Content-Type": "application/json"})
        r = h.getresponse()
        body = json.loads(r.read())
        assert r.status == 503 and r.getheader("Retry-After"), (r.status, body)
        assert body["error"]["code"] == OVERLOADED
    finally:
        c.close()


# ------------------------------------------------------------------ one owner per query
def test_outage_does_not_fill_the_queue_with_answered_queries(frontend_factory):
    fe = frontend_factory(max_queue_length=100)
    mv = deploy(fe, "outage", "row_sum", slo_ms=50.0)
    (pid,) = fe.replica_pids(mv.key)
    c = WireConn(fe.port)
    x = _x(1.0)
    n, rate = 450, 300.0
    try:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(n):  # 1.5 s at 300/s while the only replica is stopped
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                c.send(wire.predict(i, "outage", x))
        finally:
            os.kill(pid, signal.SIGCONT)
        replies = c.recv(n, timeout=30)
    finally:
        c.close()
    codes = [m[2] for m in replies if m[0] == wire.ERROR]
    assert QUEUE_FULL not in codes, f"{codes.count(QUEUE_FULL)} QUEUE_FULL of {n} (the queue held answered queries)"
    assert all(m[0] == wire.RESULT for m in replies)


# ------------------------------------------------------------------ graceful drain
def test_sigterm_leaves_no_request_without_a_reply(tmp_path):
    from bench.harness import NOOP_TOML, write_deployment
    from bench.run import clipper_server

    # A model that takes 50 ms per batch (of at most 8) against 200 queries a second: at the SIGTERM
    # dozens of queries are queued or in a batch, and a drain must answer them all.
    zoo = Path(__file__).resolve().parent / "model_zoo.py"
    cfg = write_deployment(
        NOOP_TOML, tmp_path / "drain.toml", frontend={"drain_timeout_ms": 3000},
        extra_apps=[{"name": "drain", "input_dtype": "float32", "input_shape": [4], "slo_ms": 1000, "cache": False,
                     "default_output": -1.0}],
        extra_models=[{"name": "drain-m", "version": "1", "input_dtype": "float32", "input_shape": [4],
                       "entry": f"{zoo}:sleep_by_input", "replicas": 1, "max_batch": 8}],
        extra_links=[{"app": "drain", "model": "drain-m"}])
    server = clipper_server(cfg, tmp_path, 90, [sys.executable, "-m", "clipper"], "drain")
    info = server.start()
    try:
        sock = socket.create_connection(("127.0.0.1", int(info["query_port"])), timeout=10)
        x = _x(0.05)
        sent, replies, closed = 0, {}, threading.Event()
        told_to_stop = threading.Event()

        def receive():
            reader = framing.FrameReader(1 << 24)
            unpack = wire.make_unpacker()
            while True:
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    break
                if not data:
                    break
                for body in reader.feed(data):
                    msg = unpack(body)
                    replies[msg[1]] = msg
                    if msg[0] == wire.ERROR and msg[2] == SHUTTING_DOWN:
                        told_to_stop.set()
            closed.set()

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0 and not told_to_stop.is_set() and not closed.is_set():
            if sent == 200:  # a second of load, then SIGTERM; a well-behaved client stops when told
                os.kill(server.proc.pid, signal.SIGTERM)
            try:
                sock.sendall(framing.pack_frame(wire.pack(wire.predict(sent, "drain", x))))
            except OSError:
                break
            sent += 1
            time.sleep(1 / 200)
        closed.wait(15)
        sock.close()
        missing = [i for i in range(sent) if i not in replies]
        kinds = {}
        for m in replies.values():
            k = "result" if m[0] == wire.RESULT else f"error {m[2]}"
            kinds[k] = kinds.get(k, 0) + 1
        assert not missing, f"{len(missing)} of {sent} requests got no reply; replies {kinds}"
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


# ------------------------------------------------------------------ byte budgets and flow control
def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Read (and drop) whatever comes until EOF (True) or ``within_s`` passes with the connection open."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


def _ping_ok(port: int) -> bool:
    c = WireConn(port)
    try:
        c.send(wire.ping(9))
        return c.recv(1, timeout=10)[0] == [wire.PONG, 9]
    finally:
        c.close()


def test_partial_frames_past_the_budget_are_closed(frontend_factory):
    frame = 4 * 1024 * 1024
    fe = frontend_factory(max_frame_bytes=frame, max_partial_frame_bytes=8 * 1024 * 1024)
    body = bytes(frame - 1)
    socks = []
    try:
        for _ in range(6):  # 24 MiB of unfinished frames against an 8 MiB budget
            s = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
            s.settimeout(5)
            try:
                s.sendall(struct.pack(">I", frame) + body)
            except OSError:
                pass
            socks.append(s)
        closed = sum(_closed_by_server(s, 2.0 / len(socks)) for s in socks)
        assert closed >= 3, f"{closed} of 6 connections holding 4 MiB partial frames were closed (budget 8 MiB)"
        assert _ping_ok(fe.port)
    finally:
        for s in socks:
            s.close()


def _flood_without_reading(port: int, seconds: float) -> bool:
    """Pipeline HELLOs without ever reading; True when the server closed the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    batch = framing.pack_frame(wire.pack(wire.hello(1))) * 1024
    t_end = time.monotonic() + seconds
    try:
        s.settimeout(0.5)
        while time.monotonic() < t_end:
            try:
                s.sendall(batch)
            except TimeoutError:
                continue  # the server stopped reading: keep trying until it closes or time is up
            except OSError:
                return True
        return _closed_by_server(s, 1.0)
    finally:
        s.close()


def test_client_that_never_reads_is_closed(frontend_factory):
    fe = frontend_factory(max_unread_reply_bytes=1024 * 1024, write_stall_timeout_ms=300)
    assert _flood_without_reading(fe.port, 2.0)
    assert _ping_ok(fe.port)


def test_unread_metrics_requests_do_not_stall_the_query_port(frontend_factory):
    fe = frontend_factory()
    for i in range(10):  # a scrape with something in it (the code before issue 10: ~2 ms each, on the loop)
        fe.call(fe.fe.register_application(Application(f"m{i}", "float32", (4,), slo_ms=100.0)))
    s = socket.create_connection(("127.0.0.1", fe.fe.metrics_port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood = threading.Thread(target=lambda: _send_quietly(s, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2000),
                             daemon=True)
    c = WireConn(fe.port)
    try:
        flood.start()
        time.sleep(0.3)
        rtts = []
        for i in range(5):  # PINGs on the query port while 2,000 scrapes nobody reads are pending
            t0 = time.monotonic()
            c.send(wire.ping(i))
            assert c.recv(1, timeout=20)[0] == [wire.PONG, i]
            rtts.append(time.monotonic() - t0)
        # Before issue 10: ~4 s here (and 30 s behind 20,000 scrapes of a larger frontend); 1 s is generous.
        assert max(rtts) < 1.0, f"PING round trips {[round(r, 3) for r in rtts]} s behind unread /metrics scrapes"
    finally:
        c.close()
        s.close()
        flood.join(10)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(5)
        sock.sendall(data)
    except OSError:
        pass


# ------------------------------------------------------------------ timeouts and connection limits
@pytest.mark.parametrize("port_name", ["query", "rest"])
def test_slowloris_is_cut_off(frontend_factory, port_name):
    fe = frontend_factory(header_timeout_ms=200)
    port = fe.port if port_name == "query" else fe.fe.rest_port
    head = struct.pack(">I", 1000) + bytes(1000) if port_name == "query" else (
        b"POST /x/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 100)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        closed = False
        for i in range(15):  # one byte every 100 ms for up to 1.5 s
            try:
                s.sendall(head[i:i + 1])
            except OSError:
                closed = True
                break
            if _closed_by_server(s, 0.1):
                closed = True
                break
        assert closed, f"a {port_name} client sending one byte every 100 ms was not cut off (header_timeout 200 ms)"
    finally:
        s.close()


def test_idle_connection_is_closed(frontend_factory):
    fe = frontend_factory(idle_timeout_ms=200)
    s = socket.create_connection(("127.0.0.1", fe.port), timeout=10)
    try:
        assert _closed_by_server(s, 2.0), "an idle connection outlived idle_timeout_ms=200 by 10x"
    finally:
        s.close()


def test_oversized_rest_head_is_refused(frontend_factory):
    fe = frontend_factory(max_header_bytes=4096)
    s = socket.create_connection(("127.0.0.1", fe.fe.rest_port), timeout=10)
    try:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 65536 + b"\r\n\r\n"
        try:
            s.sendall(head)
        except OSError:
            pass
        data = b""
        s.settimeout(1.5)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        status = data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.1 ") else b""
        assert status in (b"400", b"413", b"431"), f"a 64 KiB header (limit 4 KiB) got {data[:80]!r}"
    finally:
        s.close()


@pytest.mark.parametrize("port_name", ["metrics", "admin"])
def test_metrics_and_admin_connection_limits(frontend_factory, port_name):
    fe = frontend_factory(max_metrics_connections=8, max_admin_connections=8)
    port = fe.fe.metrics_port if port_name == "metrics" else fe.fe.admin_port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.5)
        closed = sum(_closed_by_server(s, 0.02) for s in socks)
        assert closed >= 12, f"{closed} of 20 connections closed by a {port_name} port limited to 8"
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ bounded replies
def test_a_huge_bin_request_id_is_not_echoed(frontend_factory, wire_conn):
    fe = frontend_factory()
    c = wire_conn(fe.port)
    c.send([wire.PREDICT, b"\xab" * (1 << 20), "noop", [1.0]])
    sock = c.sock
    sock.settimeout(10)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "the server closed the connection instead of answering"
        head += chunk
    (n,) = struct.unpack(">I", head)
    assert n < 4096, f"a 1 MiB bin request id came back as a {n}-byte error"


def test_rest_input_batch_is_capped(frontend_factory):
    fe = frontend_factory(max_batch_items=1024)
    deploy(fe, "batchcap", "row_sum", slo_ms=200.0)
    h = http.client.HTTPConnection("127.0.0.1", fe.fe.rest_port, timeout=30)
    h.request("POST", "/batchcap/predict", json.dumps({"input_batch": [[]] * 65536}),
              {"Content-Type": "application/json"})
    r = h.getresponse()
    body = r.read()
    assert r.status in (400, 413) and len(body) < 64 * 1024, (r.status, len(body))


def test_a_full_server_gives_a_slow_connections_slot_to_a_new_client(frontend_factory):
    fe = frontend_factory(max_connections=16, header_timeout_ms=30_000)
    slow = [socket.create_connection(("127.0.0.1", fe.port), timeout=10) for _ in range(16)]
    try:
        for s in slow:
            s.sendall(b"\x00")  # one byte of a length prefix, then nothing (slowloris)
        deadline = time.monotonic() + 15
        while fe.call(lambda: len(fe.fe.query_server.evictable)) < 16:
            assert time.monotonic() < deadline, "the sweep never found the slow connections"
            time.sleep(0.05)
        clients = []
        for i in range(3):  # each new client (kept open) takes the slot of the slowest slow one
            c = WireConn(fe.port)
            clients.append(c)
            c.send(wire.ping(i))
            assert c.recv(1)[0] == [wire.PONG, i]
        assert fe.call(lambda: fe.fe.query_server.closed_by.get("evicted_slow", 0)) == 3
        for c in clients:
            c.close()
    finally:
        for s in slow:
            s.close()


def test_replies_a_client_has_not_read_wait_as_frames_not_as_bytes(frontend_factory):
    # 200,000 HELLOs (4 MB), nothing read: answering them all at once would pile up 40 MB of replies (a
    # HELLO_OK is ten times its HELLO), more than the kernel's socket buffers take. The frontend stops
    # answering once writing pauses and keeps the rest as frames; every reply still comes, in order,
    # once the client reads.
    fe = frontend_factory(max_write_buffer_bytes=64 * 1024, max_unread_reply_bytes=1024 * 1024)
    c = WireConn(fe.port)
    n = 200_000
    data = b"".join(framing.pack_frame(wire.pack(wire.hello(i))) for i in range(n))
    sender = threading.Thread(target=c.send_raw, args=(data,), daemon=True)  # it blocks once reading pauses
    sender.start()
    deadline = time.monotonic() + 20
    conn = None
    while conn is None or fe.call(lambda: conn._backlog is None):  # noqa: B023 - fe.call runs it at once
        conns = fe.call(lambda: list(fe.fe.query_server.connections))
        conn = conns[0] if conns else None
        assert time.monotonic() < deadline, "the frontend never held frames back"
        time.sleep(0.01)
    assert fe.call(lambda: conn.transport.get_write_buffer_size()) <= 1024 * 1024
    out = c.recv(n, timeout=90)
    sender.join(30)
    assert [m[1] for m in out] == list(range(n)) and all(m[0] == wire.HELLO_OK for m in out)
    assert not fe.call(lambda: conn.closed)
    c.close()


def test_a_client_streaming_oversized_frames_is_slowed(frontend_factory, monkeypatch):
    from clipper.server import query_server as qs
    from clipper.server._connection import PAUSED_JUNK

    monkeypatch.setattr(qs, "JUNK_BYTES_PER_S", 1 << 20)
    monkeypatch.setattr(qs, "JUNK_BURST_BYTES", 1 << 20)
    fe = frontend_factory(max_frame_bytes=64 * 1024)
    c = WireConn(fe.port)
    junk = struct.pack(">I", 1 << 20) + b"\0" * (1 << 20)  # a 1 MiB frame over the 64 KiB limit
    sender = threading.Thread(target=lambda: c.send_raw(junk * 4), daemon=True)
    sender.start()
    deadline = time.monotonic() + 20
    paused = False
    while not paused:
        conns = fe.call(lambda: list(fe.fe.query_server.connections))
        paused = any(fe.call(lambda: x._pause_mask & PAUSED_JUNK) for x in conns)  # noqa: B023 - fe.call runs it at once
        assert time.monotonic() < deadline, "the junk stream was never slowed"
        time.sleep(0.005)
    sender.join(30)
    out = c.recv(4, timeout=30)  # slowed, not cut off: each frame still gets its error
    assert [m[2] for m in out] == [102] * 4
    c.send(wire.ping(9))
    assert c.recv(1)[0] == [wire.PONG, 9]
    c.close()


def _held_setup(fe, app: str, slo_ms: float, default_output=-1.0):
    fe.call(fe.fe.register_application(Application(app, "float32", (4,), slo_ms=slo_ms, default_output=default_output,
                                                   cache=False, on_overload="default")))
    mv = ModelVersion(f"{app}-model", "1", "float32", (4,), entry="model_zoo.py:sleep_by_input", max_batch=1,
                      batching="fixed")
    fe.call(fe.fe.deploy_model(mv))
    fe.call(fe.fe.link(app, mv.name))
    fe.call(fe.fe.wait_ready(mv.name, "1", timeout_s=60))
    _warm(fe, app, _x(0.2))


def test_held_default_answers_go_at_once_when_a_drain_begins_and_never_to_a_closed_connection(frontend_factory):
    # With a 4 s SLO the refused queries' defaults are held 3.6 s (default_refusal_hold 0.9). One client
    # closes its connection while its answers are held: they are dropped, nothing fails. A drain begun
    # at once writes the other client's held answers straight away, long before their hold would end.
    fe = frontend_factory(default_refusal_hold=0.9)
    _held_setup(fe, "held", 4000.0)
    x = _x(0.2)
    gone = WireConn(fe.port)
    gone.send_raw(b"".join(framing.pack_frame(wire.pack(wire.predict(i, "held", x))) for i in range(100)))
    c = WireConn(fe.port)
    c.send_raw(b"".join(framing.pack_frame(wire.pack(wire.predict(i, "held", x))) for i in range(100, 300)))
    # every request of both bursts read (the two of the warm-up, then 300) and most of them refused, held
    deadline = time.monotonic() + 20
    while fe.call(lambda: fe.fe.processor.routes["held"].requests) < 302:
        assert time.monotonic() < deadline, "the bursts were not all read"
        time.sleep(0.01)
    assert fe.call(lambda: fe.fe.processor.routes["held"].overloaded) >= 250
    gone.close()
    held = fe.call(lambda: len(fe.fe.query_server.held))
    assert held >= 2, held  # (a run is one entry: at least one per connection)
    t0 = time.monotonic()
    drained = asyncio.run_coroutine_threadsafe(fe.fe.drain(30), fe.loop)
    replies = {}
    while len(replies) < 200:
        for m in c.recv(1, timeout=10):
            replies[m[1]] = (time.monotonic() - t0, m)
    drained.result(30)
    defaults = [lat for lat, m in replies.values() if m[0] == wire.RESULT and m[4]]
    assert len(defaults) >= 150 and max(defaults) < 1.0, (len(defaults), max(defaults))
    assert fe.call(lambda: len(fe.fe.query_server.held)) == 0
    assert set(replies) == set(range(100, 300))


@pytest.mark.parametrize("hold", [0.0, 0.5])
def test_a_run_of_large_default_answers_is_paced_by_a_client_that_reads_late_not_cut_off(frontend_factory, hold):
    # A default output of 200 numbers (about 1.8 KB a reply) for 12,000 small PREDICTs written at once:
    # about 22 MB of answers, past max_unread_reply_bytes (16 MiB). Answered at once (no hold), the runs
    # stop at each MiB of answers, so the port writes them and stops reading while the client does not
    # read; held, a connection holds at most a quarter of max_unread_reply_bytes and the rest goes at once
    # the same way. The client reads everything late and gets every answer, once.
    fe = frontend_factory(default_refusal_hold=hold)
    _held_setup(fe, "big", 300.0, default_output=[0.5] * 200)
    n = 12_000
    x = _x(0.2)
    data = b"".join(framing.pack_frame(wire.pack(wire.predict(i, "big", x))) for i in range(n))
    c = WireConn(fe.port)
    sender = threading.Thread(target=c.send_raw, args=(data,), daemon=True)
    sender.start()
    sender.join(1.0)  # the client writes (blocked, at some point, by a server that stopped reading) ...
    seen = set()
    while len(seen) < n:  # ... and only then reads
        for m in c.recv(1, timeout=30):
            assert m[1] not in seen, f"request {m[1]} answered twice"
            seen.add(m[1])
    sender.join(10)
    assert not sender.is_alive()
    assert "unread_replies" not in fe.call(lambda: dict(fe.fe.query_server.closed_by))
    assert fe.call(lambda: fe.fe.processor.routes["big"].defaults) >= n - 10
