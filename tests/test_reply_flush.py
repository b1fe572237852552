"""The msgpack port's reply flush (QueryServer.flush_dirty), in process with real connection objects.

Replies a connection queues are written once per loop turn for all connections
(one scheduled flush), or at once when a batch's answers are settled
(``ModelQueue.on_answered``); a connection whose write fails is cut off
without keeping the others' replies back.
"""

from __future__ import annotations

import asyncio

from clipper.config import Limits
from clipper.query.processor import QueryProcessor
from clipper.server.query_server import QueryConnection, QueryServer


class Transport:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data) -> None:
        if self.fail:
            raise OSError("the socket is gone")
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name):
        return None

    def set_write_buffer_limits(self, high=None) -> None:
        pass


def _server(loop) -> QueryServer:
    return QueryServer(loop, QueryProcessor(loop, Limits().max_input_bytes, 0), Limits(), "test")


def _conn(server, transport) -> QueryConnection:
    conn = QueryConnection(server)
    conn.transport = transport
    return conn


def test_replies_of_all_connections_go_out_in_one_scheduled_flush_or_at_once():
    loop = asyncio.new_event_loop()
    try:
        server = _server(loop)
        a, b = _conn(server, Transport()), _conn(server, Transport())
        a._queue(b"a1")
        b._queue(b"b1")
        a._queue(b"a2")
        assert server.dirty == [a, b] and server.flush_pending  # one flush scheduled for both
        assert not a.transport.written
        loop.run_until_complete(asyncio.sleep(0))  # the loop's turn
        assert a.transport.written == [b"a1a2"] and b.transport.written == [b"b1"]
        assert server.dirty == [] and not server.flush_pending
        a._queue(b"a3")
        server.flush_dirty()  # at once (a batch's answers settled): written before the turn ends
        assert a.transport.written == [b"a1a2", b"a3"]
        loop.run_until_complete(asyncio.sleep(0))  # the turn's own flush finds nothing left
        assert a.transport.written == [b"a1a2", b"a3"]
    finally:
        loop.close()


def test_a_connection_whose_write_fails_is_cut_off_and_the_others_are_written():
    loop = asyncio.new_event_loop()
    try:
        server = _server(loop)
        bad, good = _conn(server, Transport(fail=True)), _conn(server, Transport())
        bad._queue(b"x")
        good._queue(b"y")
        server.flush_dirty()
        assert bad.transport.aborted and not good.transport.aborted
        assert good.transport.written == [b"y"]
        # closed and counted like any cut-off: nothing more is written to it
        assert bad.closed and server.closed_by == {"write_failed": 1}
        bad.transport.fail = False
        bad._queue(b"z")
        server.flush_dirty()
        assert bad.transport.written == []
    finally:
        loop.close()


def test_held_answers_that_are_due_go_out_with_the_next_flush_and_the_rest_wait_their_time():
    loop = asyncio.new_event_loop()
    try:
        server = _server(loop)
        a, b = _conn(server, Transport()), _conn(server, Transport())
        server.hold(a, b"<held>", 0)  # due at once
        server.hold(a, b"<later>", 10**9)  # due in a second
        server.hold(b, b"<b-held>", 0)
        assert b.busy()  # answers held for it: the idle timeout leaves it open
        a._queue(b"<reply>")
        server.flush_dirty()  # a regular flush takes what is due along: one write per connection
        assert a.transport.written == [b"<reply><held>"] and b.transport.written == [b"<b-held>"]
        assert [f for *_, f in server.held] == [b"<later>"] and a.held_bytes == len(b"<later>") and b.held_bytes == 0
        assert server.held_timer is not None and server.held_timer.when() > loop.time() + 0.5
        b.closed = True  # a closed connection's held answers are dropped, never written
        server.hold(b, b"<gone>", 0)
        server.release_held(everything=True)  # (a drain: all at once)
        loop.run_until_complete(asyncio.sleep(0))
        assert a.transport.written == [b"<reply><held>", b"<later>"] and b.transport.written == [b"<b-held>"]
        assert not server.held and server.held_timer is None
    finally:
        loop.close()


def test_a_hold_shorter_than_the_loops_tick_and_a_failing_release_break_nothing_on_uvloop():
    # uvloop gives a plain Handle (no when()) for a time under half a millisecond away: holds keep their
    # own due time. A connection whose held answers cannot be written is cut off; the others' answers,
    # held or not, still go out, and the hold's timer is armed again for what is left.
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        server = _server(loop)
        bad, good = _conn(server, Transport()), _conn(server, Transport())
        server.hold(good, b"<g1>", 100_000)  # 0.1 ms
        server.hold(bad, b"<b1>", 100_000)
        server.hold(good, b"<g2>", 10**9)
        bad.transport.fail = True
        good._queue(b"<reply>")
        loop.run_until_complete(asyncio.sleep(0.005))
        assert bad.closed and server.closed_by == {"write_failed": 1}
        assert b"".join(good.transport.written) == b"<reply><g1>"
        assert [f for *_, f in server.held] == [b"<g2>"] and server.held_timer is not None
        assert not server.flush_pending and server.dirty == []
    finally:
        loop.close()
