"""Timeouts, flow control and byte budgets on every port, tried as abusive clients would: raw sockets
against a real frontend with short configured limits. Every wait is bounded; nothing asserts a latency."""

from __future__ import annotations

import socket
import time

import pytest

from clipper import errors as E
from clipper._native import framing
from clipper.protocol import wire
from conftest import WireConn

PORTS = ["msgpack", "rest", "admin", "metrics"]


def port_of(rf, kind: str) -> int:
    fe = rf.fe
    ports = {"msgpack": fe.query_port, "rest": fe.rest_port, "admin": fe.admin_port, "metrics": fe.metrics_port}
    return ports[kind]


def server_of(rf, kind: str):
    fe = rf.fe
    return {"msgpack": fe.query_server, "rest": fe.rest, "admin": fe.admin, "metrics": fe.metrics}[kind]


def closed_by(rf, kind: str) -> dict:
    return rf.call(lambda: dict(server_of(rf, kind).closed_by))


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll ``predicate()`` until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


def read_until_closed(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded: TimeoutError if it does not)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server did not close the connection within {timeout} s; got {data[:200]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def complete_request(rf, kind: str) -> bytes:
    """One complete, valid request for the port ``kind``."""
    port = port_of(rf, kind)
    if kind == "msgpack":
        return framing.pack_frame(wire.pack(wire.ping(1)))
    path = {"rest": "/healthz", "admin": "/health", "metrics": "/metrics"}[kind]
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def partial_request(rf, kind: str) -> bytes:
    """The first bytes of a request that never completes."""
    if kind == "msgpack":
        return framing.pack_frame(wire.pack(wire.ping(1)))[:3]
    return complete_request(rf, kind)[:20]


def assert_told_timeout(kind: str, data: bytes) -> None:
    if kind == "msgpack":
        msgs = [wire.make_unpacker()(f) for f in framing.FrameReader(1 << 20).feed(data)]
        assert msgs and msgs[-1][0] == wire.ERROR and msgs[-1][2] == E.LimitExceededError.code, msgs
        assert "header_timeout_ms" in msgs[-1][4]
    else:
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert b"header_timeout_ms" in data and b"Connection: close" in data


@pytest.mark.parametrize("kind", PORTS)
def test_slowloris_connections_are_cut_off_and_free_their_slots(frontend_factory, kind):
    n = 150
    rf = frontend_factory(header_timeout_ms=400, max_connections=n, max_admin_connections=n,
                          max_metrics_connections=n)
    port = port_of(rf, kind)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    try:
        first = partial_request(rf, kind)
        for s in socks:
            s.sendall(first[:1])
        for s in socks:  # one more byte each: trickling does not extend the deadline
            s.sendall(first[1:2])
        for s in socks:
            assert_told_timeout(kind, read_until_closed(s))
    finally:
        for s in socks:
            s.close()
    assert closed_by(rf, kind).get("header_timeout", 0) >= n
    # every slot is free again, and a server without connections runs no sweep (no CPU when idle)
    srv = server_of(rf, kind)
    wait_for(lambda: rf.call(lambda: not srv.connections and srv._sweep_handle is None), what="slots freed")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(complete_request(rf, kind))
            reply = s.recv(65536)
            assert reply and not reply.startswith((b"HTTP/1.1 5", b"HTTP/1.1 4")), reply[:200]


@pytest.mark.parametrize("kind", PORTS)
def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(frontend_factory, kind):
    rf = frontend_factory(header_timeout_ms=300)
    with socket.create_connection(("127.0.0.1", port_of(rf, kind)), timeout=30) as s:
        assert_told_timeout(kind, read_until_closed(s))


@pytest.mark.parametrize("kind", PORTS)
def test_an_idle_connection_is_closed_and_a_busy_one_is_not(frontend_factory, kind):
    rf = frontend_factory(idle_timeout_ms=300, header_timeout_ms=60_000)
    with socket.create_connection(("127.0.0.1", port_of(rf, kind)), timeout=30) as s:
        s.sendall(complete_request(rf, kind))
        data = read_until_closed(s)
    assert data  # the answer came, then the close
    if kind != "msgpack":
        assert data.startswith(b"HTTP/1.1 200")
    assert closed_by(rf, kind).get("idle_timeout", 0) == 1


def test_a_new_client_is_served_while_slowloris_connections_hold_their_slots(frontend_factory):
    rf = frontend_factory(header_timeout_ms=60_000, max_connections=400)
    rest_port, query_port = rf.fe.rest_port, rf.fe.query_port
    socks = []
    try:
        for i in range(150):
            for port in (rest_port, query_port):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(b"POST /x/predict HTTP/1.1\r\nHost: a\r\nX-Slow: " if port == rest_port else b"\x00\x00")
                socks.append(s)
        with socket.create_connection(("127.0.0.1", rest_port), timeout=30) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_until_closed(s).startswith(b"HTTP/1.1 200")
        c = WireConn(query_port)
        try:
            for i in range(5):
                c.send(wire.ping(i))
                assert c.recv(1)[0][:2] == [wire.PONG, i]
        finally:
            c.close()
    finally:
        for s in socks:
            s.close()


def test_a_full_port_takes_new_clients_again_once_slowloris_connections_time_out(frontend_factory):
    rf = frontend_factory(header_timeout_ms=500, max_connections=40)
    port = rf.fe.rest_port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        answers = []

        def served() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                reply = read_until_closed(s)
            answers.append(reply[:12])
            return reply.startswith(b"HTTP/1.1 200")

        wait_for(served, timeout=30, what="a new client served")
        assert all(a in (b"HTTP/1.1 200", b"HTTP/1.1 503") for a in answers), answers
        for s in socks:
            assert read_until_closed(s).startswith(b"HTTP/1.1 408")
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ clients that do not read
def _non_reading_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
    s.connect(("127.0.0.1", port))
    return s


def _shrink_server_send_buffers(rf) -> None:
    """Make the msgpack connections' kernel send buffers small, so the transport's own buffer shows
    at once what the client leaves unread."""
    def shrink():
        for conn in rf.fe.query_server.connections:
            sock = conn.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rf.call(shrink)


def _blast(s: socket.socket, data: bytes, limit_s: float = 20.0) -> None:
    """Send ``data`` until it is all sent, the server stops reading (the kernel buffers fill) or closes."""
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + limit_s
    stalled = 0
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += s.send(data[sent:sent + 65536])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            if stalled > 200:  # about a second without progress: the server no longer reads
                return
            time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            return


def test_a_client_that_does_not_read_is_closed_at_the_unread_reply_cap(frontend_factory):
    # reading pauses at 1 KiB of unsent replies; one read of HELLOs makes far more than the 64 KiB cap
    rf = frontend_factory(max_write_buffer_bytes=1024, max_unread_reply_bytes=64 * 1024,
                          write_stall_timeout_ms=600_000)
    s = _non_reading_socket(rf.port)
    try:
        wait_for(lambda: rf.call(lambda: len(rf.fe.query_server.connections)) == 1, what="connected")
        _shrink_server_send_buffers(rf)
        _blast(s, framing.pack_frame(wire.pack(wire.hello(1))) * 60_000)
        wait_for(lambda: closed_by(rf, "msgpack").get("unread_replies", 0) == 1, what="closed at the cap")
        assert rf.call(lambda: len(rf.fe.query_server.connections)) == 0
    finally:
        s.close()
    c = WireConn(rf.port)  # the others are served as before
    try:
        c.send(wire.ping(3))
        assert c.recv(1)[0][:2] == [wire.PONG, 3]
    finally:
        c.close()


def test_a_client_that_does_not_read_is_closed_after_the_write_stall_timeout(frontend_factory):
    rf = frontend_factory(max_write_buffer_bytes=1024, max_unread_reply_bytes=512 * 1024 * 1024,
                          write_stall_timeout_ms=300)
    s = _non_reading_socket(rf.port)
    try:
        wait_for(lambda: rf.call(lambda: len(rf.fe.query_server.connections)) == 1, what="connected")
        _shrink_server_send_buffers(rf)
        _blast(s, framing.pack_frame(wire.pack(wire.hello(1))) * 20_000)
        wait_for(lambda: closed_by(rf, "msgpack").get("write_stall", 0) == 1, what="closed after the stall")
        assert closed_by(rf, "msgpack").get("unread_replies", 0) == 0
    finally:
        s.close()


def test_a_rest_client_that_does_not_read_is_closed_at_the_unread_reply_cap(frontend_factory):
    from clipper.management.registry import Application

    rf = frontend_factory(max_write_buffer_bytes=1024, max_unread_reply_bytes=256 * 1024,
                          write_stall_timeout_ms=600_000)
    for i in range(100):  # /readyz names each of them: a ~6 kB answer to a 30-byte request
        rf.call(rf.fe.register_application(Application(f"unready-{i}", "float32", [4])))
    s = _non_reading_socket(rf.fe.rest_port)
    try:
        _blast(s, b"GET /readyz HTTP/1.1\r\n\r\n" * 20_000)
        wait_for(lambda: closed_by(rf, "rest").get("unread_replies", 0) == 1, what="closed at the cap")
    finally:
        s.close()


# ------------------------------------------------------------------ partial frames, frontend-wide
def _partial_frame(n_body: int, total: int, req_id: int) -> tuple[bytes, bytes]:
    """A PING frame padded to ``total`` bytes of body, split after ``n_body`` bytes of it."""
    frame = framing.pack_frame(wire.pack([wire.PING, req_id, b"x" * (total - 16)]))
    return frame[:4 + n_body], frame[4 + n_body:]


def test_the_connection_that_passes_the_partial_frame_budget_is_closed(frontend_factory):
    rf = frontend_factory(max_partial_frame_bytes=1024 * 1024)
    budget = lambda: rf.call(lambda: rf.fe.partial_budget.used)  # noqa: E731
    good = WireConn(rf.port)
    holders = [socket.create_connection(("127.0.0.1", rf.port), timeout=30) for _ in range(3)]
    try:
        head, rest = _partial_frame(600_000, 900_000, 7)  # completes within the budget
        holders[0].sendall(head)
        wait_for(lambda: budget() >= 600_000, what="the first partial frame held")
        good.send(wire.ping(1))
        assert good.recv(1)[0][:2] == [wire.PONG, 1]
        for s in holders[1:]:  # each would take the frontend past 1 MiB: LIMIT_EXCEEDED, closed
            try:
                s.sendall(_partial_frame(600_000, 4 * 1024 * 1024, 8)[0])
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = read_until_closed(s)
            msgs = [wire.make_unpacker()(f) for f in framing.FrameReader(1 << 20).feed(data)]
            assert msgs and msgs[-1][0] == wire.ERROR and msgs[-1][2] == E.LimitExceededError.code, msgs
            assert "max_partial_frame_bytes" in msgs[-1][4]
            good.send(wire.ping(2))
            assert good.recv(1)[0][:2] == [wire.PONG, 2]
        assert closed_by(rf, "msgpack").get("partial_budget", 0) == 2
        wait_for(lambda: budget() == 600_000, what="the closed connections' bytes released")
        # a small frame split across reads while the budget is spent is never refused (grace)
        fill, _ = _partial_frame(1024 * 1024 - 600_000 - 1000, 4 * 1024 * 1024, 9)
        filler = socket.create_connection(("127.0.0.1", rf.port), timeout=30)
        holders.append(filler)
        filler.sendall(fill)
        wait_for(lambda: budget() >= 1024 * 1024 - 1000, what="the budget nearly spent")
        small = framing.pack_frame(wire.pack([wire.PING, 5, b"y" * 20_000]))
        good.send_raw(small[:15_000])
        wait_for(lambda: budget() > 1024 * 1024, what="the budget passed by the small frame's first part")
        good.send_raw(small[15_000:])
        assert good.recv(1)[0][:2] == [wire.PONG, 5]
        filler.close()
        wait_for(lambda: budget() == 600_000, what="the filler's bytes released")
        # the first holder finishes its frame and is answered
        holders[0].sendall(rest)
        holders[0].settimeout(30)
        reader = framing.FrameReader(1 << 20)
        got = []
        while not got:
            got = reader.feed(holders[0].recv(65536))
        msg = wire.make_unpacker()(got[0])
        assert msg[:2] == [wire.PONG, 7], msg
    finally:
        good.close()
        for s in holders:
            s.close()
    wait_for(lambda: budget() == 0, what="every byte released")


def test_unfinished_rest_bodies_count_against_the_partial_frame_budget(frontend_factory):
    rf = frontend_factory(max_partial_frame_bytes=1024 * 1024)
    port = rf.fe.rest_port
    head = (b"POST /x/predict HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000000\r\n\r\n")
    first = socket.create_connection(("127.0.0.1", port), timeout=30)
    second = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        first.sendall(head + b" " * 700_000)
        wait_for(lambda: rf.call(lambda: rf.fe.partial_budget.used) >= 700_000, what="the first body held")
        try:
            second.sendall(head + b" " * 700_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_until_closed(second)
        assert data.startswith(b"HTTP/1.1 503") and b"LIMIT_EXCEEDED" in data and b"Retry-After: 1" in data
        assert b"max_partial_frame_bytes" in data
        assert closed_by(rf, "rest").get("partial_budget", 0) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # others are served
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_until_closed(s).startswith(b"HTTP/1.1 200")
    finally:
        first.close()
        second.close()
    wait_for(lambda: rf.call(lambda: rf.fe.partial_budget.used) == 0, what="every byte released")
