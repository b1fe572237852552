"""What every client connection of the frontend shares: connection limits, flow control, timeouts,
the frontend-wide budget of partial bytes, and TLS.

Every listening port (msgpack, REST, admin, metrics) is a :class:`ClientServer` whose connections
are :class:`ClientConnection` subclasses. The rules they all keep (``Limits`` names):

* ``max_connections`` (or the port's own limit): a connection past it is told so and closed.
* flow control: a client that does not read its replies stops being read once
  ``max_write_buffer_bytes`` (at most half of ``max_unread_reply_bytes``) of them wait; one whose
  unsent replies pass ``max_unread_reply_bytes``, or that stays paused for
  ``write_stall_timeout_ms``, is closed.
* ``header_timeout_ms``: a frame (msgpack) or a request head (HTTP) must arrive completely within
  this from its first byte, and a new connection must send its first byte within it (slowloris).
* ``idle_timeout_ms``: a connection with nothing in flight for this long is closed.
* ``max_partial_frame_bytes``: bytes held for unfinished frames and request bodies, frontend-wide
  (one :class:`ByteBudget` shared by the ports). A connection whose growth passes it is closed
  with ``LIMIT_EXCEEDED``; a connection holding at most :data:`PARTIAL_GRACE_BYTES` never is,
  so small frames split across reads are never hurt.

Timeouts cost no timer per connection: each server runs one sweep (``loop.call_later``, every
``sweep_interval_s``, armed only while it has connections) over monotonic timestamps the
connections keep.
"""

from __future__ import annotations

import asyncio
import time

from .. import errors as E

__all__ = ["ByteBudget", "ClientConnection", "ClientServer", "PARTIAL_GRACE_BYTES"]

_monotonic = time.monotonic

# Why reading is paused (one bit each; reading resumes when none is left).
PAUSED_WRITE = 1  # the client does not read its replies
PAUSED_BACKLOG = 2  # HTTP: too many pipelined requests wait for their answers
PAUSED_CLOSING = 4  # a closing reply is queued: nothing more is read
PAUSED_JUNK = 8  # msgpack: the client sends oversized frames faster than JUNK_BYTES_PER_S

# A connection holding at most this many partial bytes is never closed by the frontend-wide budget
# (it is still charged): a pipelining client's small frames are split across reads all the time.
PARTIAL_GRACE_BYTES = 64 * 1024


class ByteBudget:
    """Bytes held frontend-wide for one purpose (unfinished frames and request bodies), against a limit.

    Plain counters, used on the event loop's thread only; connections charge and release
    what they hold (:meth:`ClientConnection._charge`).
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class ClientServer:
    """A listening socket on the frontend's loop whose connections are ``connection_class(self)``.

    Subclasses set ``connection_class``, call ``super().__init__`` and may set
    ``max_connections_name`` (the limit's name in the refusal message) and ``interface``
    (the port's name in metrics).
    """

    connection_class: type = None  # type: ignore[assignment]  # each subclass sets it
    interface = "client"
    max_connections_name = "max_connections"
    _server: asyncio.Server | None = None

    def __init__(self, loop, limits, *, max_connections: int | None = None,
                 partial_budget: ByteBudget | None = None) -> None:
        """``partial_budget``: the frontend's shared budget of partial bytes (a new one of
        ``limits.max_partial_frame_bytes`` when None)."""
        self.loop = loop
        self.limits = limits
        self.connections: set = set()
        self.max_connections = limits.max_connections if max_connections is None else max_connections
        self.partial_budget = partial_budget if partial_budget is not None else ByteBudget(
            limits.max_partial_frame_bytes)
        self.closed_by: dict[str, int] = {}  # connections this server closed, by reason (metrics)
        self.header_timeout_s = limits.header_timeout_ms / 1000
        self.idle_timeout_s = limits.idle_timeout_ms / 1000
        self.write_stall_timeout_s = limits.write_stall_timeout_ms / 1000
        # A quarter of the shortest timeout, within [20 ms, 1 s]: a timeout fires at most 25% late,
        # and with the defaults the sweep runs once a second.
        shortest = min(self.header_timeout_s, self.idle_timeout_s, self.write_stall_timeout_s)
        self.sweep_interval_s = min(1.0, max(0.02, shortest / 4))
        self.max_unread_bytes = limits.max_unread_reply_bytes
        # Reading pauses before the hard cap, so that a client that reads slowly is paused, not cut off.
        self.high_water = max(1, min(limits.max_write_buffer_bytes, limits.max_unread_reply_bytes // 2))
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Connections the last sweep found in the middle of a request (or waiting for a first byte) for
        # longer than evict_after_s: when the server is full, a new client takes the slot of one of them.
        # Slow connections (slowloris) then cannot keep newcomers out by reopening as fast as they close.
        self.evict_after_s = min(1.0, self.header_timeout_s / 2)
        self.evictable: list = []

    reuse_port = False  # SO_REUSEPORT (``clipper start --workers N``: every worker listens on the same port)

    async def start(self, host: str, port: int, ssl=None) -> int:
        """Listen; returns the bound port (``port`` 0 binds a free one).

        With ``ssl`` (a server-side :class:`ssl.SSLContext`) every connection
        is TLS; a client that has not finished its handshake within
        ``limits.tls_handshake_timeout_ms`` is dropped. Connections are made
        (and count against ``max_connections``) once their handshake is done.
        """
        tls = {} if ssl is None else {"ssl": ssl, "ssl_handshake_timeout": self.limits.tls_handshake_timeout_ms / 1000}
        if self.reuse_port:  # several frontend processes on this port: the kernel spreads connections among them
            tls["reuse_port"] = True
        self._server = await self.loop.create_server(lambda: self.connection_class(self), host, port, backlog=1024,
                                                     **tls)
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listening socket; the connections already open go on (a drain answers them)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.closed = True
                transport = conn.transport
                if transport is None:
                    continue
                if transport.get_write_buffer_size():  # a client that does not read would keep it open
                    transport.abort()
                else:
                    transport.close()
            await self._server.wait_closed()
            self._server = None

    def count_close(self, reason: str) -> None:
        self.closed_by[reason] = self.closed_by.get(reason, 0) + 1

    # ------------------------------------------------------------ the sweep
    def _arm_sweep(self) -> None:
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(self.sweep_interval_s, self._sweep)

    def _sweep(self) -> None:
        """Close the connections past a timeout; runs again only while connections remain."""
        self._sweep_handle = None
        if not self.connections:
            return
        now = _monotonic()
        slow = []
        evict_after = self.evict_after_s
        for conn in list(self.connections):
            conn._check_timeouts(now)
            since = conn._partial_since
            if since and not conn.closed and now - since > evict_after:
                slow.append((since, conn))
        slow.sort(key=lambda sc: sc[0], reverse=True)  # the oldest last: popped first
        self.evictable = [c for _, c in slow]
        if self.connections:
            self._arm_sweep()

    def evict_one(self) -> bool:
        """Close the slowest connection stuck in a request, for a new client (False: none is)."""
        now = _monotonic()
        evictable = self.evictable
        while evictable:
            conn = evictable.pop()
            since = conn._partial_since
            if not conn.closed and since and now - since > self.evict_after_s:
                conn.close_for("evicted_slow", E.LimitExceededError(
                    f"the server is full ({self.max_connections_name} is {self.max_connections}) and this "
                    f"connection has not completed a request for {now - since:.1f} s: its slot went to a new client"),
                    408)
                return True
        return False


class ClientConnection(asyncio.Protocol):
    """Base of every client connection (msgpack, REST, admin, metrics).

    ``server`` is a :class:`ClientServer`. Subclasses write ``refusal(exc,
    status)`` (the bytes that tell the client why it is cut off), say in
    ``busy()`` what they have in flight, and keep ``_partial_since`` (monotonic
    seconds since the unfinished frame or request began; 0.0 for none) and
    ``_last_active`` up to date; the server's sweep does the rest.
    """

    def __init__(self, server) -> None:
        self.server = server
        # Never None once connection_made ran, which asyncio calls before anything else: typed so, not asserted
        # on every write (the sweep and _pause, which may come first, check).
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self._pause_mask = 0  # PAUSED_* bits: why reading is paused
        self._partial_since = 0.0  # an unfinished frame/request (or a new connection's first byte) since then
        self._last_active = 0.0  # the last read (or sweep that found the connection busy)
        self._stalled_since = 0.0  # writing paused (the client does not read) since then
        self._closed_at = 0.0  # when this side closed the transport (it may linger while it flushes)
        self._charged = 0  # bytes charged to server.partial_budget

    # ------------------------------------------------------------ to write in subclasses
    def refusal(self, exc: E.ClipperError, status: int = 503) -> bytes:
        """The bytes that tell a client why its connection is closed (``status``: for HTTP)."""
        raise NotImplementedError

    def busy(self) -> bool:
        """Something is in flight (a request being answered, replies unsent): not idle."""
        return self._pause_mask != 0 or self.transport.get_write_buffer_size() > 0

    def before_close(self) -> None:
        """Write what is ready before a connection-level error closes the connection."""

    # ------------------------------------------------------------ transport
    def connection_made(self, transport) -> None:
        self.transport = transport
        srv = self.server
        if len(srv.connections) >= srv.max_connections and not srv.evict_one():
            srv.count_close("max_connections")
            transport.write(self.refusal(E.LimitExceededError(
                f"the server has {len(srv.connections)} open connections; "
                f"{srv.max_connections_name} is {srv.max_connections}")))
            transport.close()
            self.closed = True
            return
        srv.connections.add(self)
        transport.set_write_buffer_limits(high=srv.high_water)
        # The first byte must come within header_timeout_ms (a connection that sends nothing is a slowloris too).
        self._partial_since = self._last_active = _monotonic()
        srv._arm_sweep()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._charged:
            self._charge(0)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests, and start the stall clock.
        self._stalled_since = _monotonic()
        self._pause(PAUSED_WRITE)

    def resume_writing(self) -> None:
        self._stalled_since = 0.0
        self._resume(PAUSED_WRITE)

    def _pause(self, why: int) -> None:
        if not self._pause_mask and self.transport is not None:
            self.transport.pause_reading()
        self._pause_mask |= why

    def _resume(self, why: int) -> None:
        if self._pause_mask & why:
            self._pause_mask &= ~why
            if not self._pause_mask and not self.closed:
                self.transport.resume_reading()

    # ------------------------------------------------------------ byte budgets
    def _charge(self, held: int) -> bool:
        """Charge the partial-bytes budget for ``held`` bytes now held (0 releases).

        False when this connection grew past PARTIAL_GRACE_BYTES while the frontend-wide
        budget is spent: the caller closes it (:meth:`_partial_refusal`).
        """
        budget = self.server.partial_budget
        grew = held > self._charged
        budget.used += held - self._charged
        self._charged = held
        return not (grew and held > PARTIAL_GRACE_BYTES and budget.used > budget.limit)

    def _partial_refusal(self, held: int) -> E.LimitExceededError:
        budget = self.server.partial_budget
        return E.LimitExceededError(
            f"the frontend holds {budget.used} bytes of unfinished frames and requests, this connection "
            f"{held}; max_partial_frame_bytes is {budget.limit}: the connection is closed")

    def unread_bytes(self) -> int:
        """Replies made for this client and not yet taken by it."""
        return self.transport.get_write_buffer_size()

    def _check_unread(self) -> None:
        """After a write while paused: past max_unread_reply_bytes the client is cut off."""
        if self.unread_bytes() > self.server.max_unread_bytes:
            self.abort_for("unread_replies")

    # ------------------------------------------------------------ timeouts (the server's sweep)
    def _check_timeouts(self, now: float) -> None:
        srv = self.server
        if self.closed:  # closed on this side and still flushing: a client that never reads is dropped
            if not self._closed_at:
                self._closed_at = now
            elif now - self._closed_at > srv.write_stall_timeout_s and self.transport is not None:
                self.transport.abort()
            return
        since = self._partial_since
        if since and now - since > srv.header_timeout_s:
            return self.on_header_timeout()
        since = self._stalled_since
        if since and now - since > srv.write_stall_timeout_s:
            return self.abort_for("write_stall")
        if self.busy():
            self._last_active = now
        elif now - self._last_active > srv.idle_timeout_s:
            self.close_for("idle_timeout")

    def on_header_timeout(self) -> None:
        ms = self.server.limits.header_timeout_ms
        self.close_for("header_timeout", E.LimitExceededError(
            f"no complete request within header_timeout_ms={ms} of its first byte (or of the connection's "
            f"start): the connection is closed"), 408)

    # ------------------------------------------------------------ closing
    def close_for(self, reason: str, exc: E.ClipperError | None = None, status: int = 503) -> None:
        """Close this connection for ``reason`` (counted), telling the client ``exc`` first if it reads."""
        if self.closed:
            return
        self.server.count_close(reason)
        transport = self.transport
        if exc is not None:
            self.before_close()
            transport.write(self.refusal(exc, status))
        self.closed = True
        self._closed_at = _monotonic()
        if self._charged:
            self._charge(0)
        if transport.get_write_buffer_size():  # the client does not take what is sent: do not wait for it
            transport.abort()
        else:
            transport.close()

    def abort_for(self, reason: str) -> None:
        """Drop this connection at once (its unsent replies too): the client does not read."""
        if self.closed:
            return
        self.server.count_close(reason)
        self.closed = True
        self._closed_at = _monotonic()
        if self._charged:
            self._charge(0)
        self.transport.abort()
