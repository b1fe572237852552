"""The msgpack query port: an ``asyncio.Protocol`` per client connection.

Frames are split by the native :class:`FrameReader`; each frame is decoded
and dispatched on its own, so a bad frame gets a typed ERROR and fails only
that request. Replies are gathered per connection and written once per
event-loop iteration.

With API keys required (``require_api_keys``), a connection authenticates
with the HELLO info field ``api_key``; it then holds its key's live grant
(a set of application names) and each PREDICT and FEEDBACK costs one set
lookup. Without API keys the check is one ``is None`` test.

Connection-level rules (limits, ``header_timeout_ms``, ``idle_timeout_ms``,
clients that do not read, the frontend-wide ``max_partial_frame_bytes``) are the
shared base's (``_connection.py``); ``data_received`` keeps it told what the
frame reader holds (``buffered``) and whether a frame is unfinished (``mid_frame``).
"""

from __future__ import annotations

import heapq
import logging
import time

from .. import errors as E
from .._native import framing
from ._connection import PAUSED_JUNK, PAUSED_WRITE, ClientConnection, ClientServer
from ..protocol import wire

log = logging.getLogger("clipper.server")

__all__ = ["QueryServer", "QueryConnection"]

_PREDICT = wire.PREDICT
_RESULT = wire.RESULT
_ERROR = wire.ERROR
_PackedExtra = wire.PackedExtra
_result_frame = framing.result_frame
_request_head = framing.request_head
_array_input = framing.array_input
EARLY_FLUSH_BYTES = 1 << 20  # replies gathered in one turn of the loop are written once they reach this
JUNK_BYTES_PER_S = 16 << 20  # oversized frames a client may stream (skipped unread) before it is slowed
JUNK_BURST_BYTES = 64 << 20
_check_nested = framing.check_nested
_brief = wire.brief
# The grant of a connection that has not authenticated (API keys required): no application.
_NOT_AUTHENTICATED: frozenset = frozenset()
_monotonic = time.monotonic


class QueryConnection(ClientConnection):
    """One client connection on the msgpack port."""

    def __init__(self, server: "QueryServer") -> None:
        super().__init__(server)
        self.processor = server.processor
        self.reader = framing.FrameReader(server.limits.max_frame_bytes)
        self.unpack = server.unpack
        self.pack = server.packer.pack
        self.pending = 0  # PREDICTs and FEEDBACKs awaiting their reply (max_pending_per_connection)
        self.inflight = framing.IdSet()  # ... their ids: a request reusing one is refused (DUPLICATE_REQUEST_ID)
        self.version = wire.PROTOCOL_VERSION
        self.negotiated = False  # a HELLO was answered HELLO_OK: the version is fixed from then on
        self._out: list = []
        self._out_bytes = 0  # bytes in _out
        self._flush_scheduled = False
        self.held_bytes = 0  # bytes of default answers to refusals the server holds for it (QueryServer.hold)
        self._backlog = None  # frames read but held back: the client stopped reading its replies
        self._shedding = None  # the route whose frame admission just refused at its head (see _process)
        self._run = None  # the route whose frame the array fast path just admitted (see _process)
        self._junk_seen = 0  # bytes of oversized frames the reader had skipped at the last look
        self._junk_tokens = float(JUNK_BURST_BYTES)  # what it may still skip before it is slowed
        self._junk_at = _monotonic()
        self.max_pending = server.limits.max_pending_per_connection
        # None: API keys are not required (every application is open). Else the applications this
        # connection may query: its key's live set (emptied if the key is revoked), or none yet.
        self.allowed = None if server.api_keys is None else _NOT_AUTHENTICATED
        self.grant = None  # the ApiKey this connection authenticated with
        self.auth_failures = 0

    # ------------------------------------------------------------ transport
    def refusal(self, exc: E.ClipperError, status: int = 503) -> bytes:
        return framing.pack_frame(wire.pack(wire.error(None, exc)))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.closed:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data) -> None:
        now = self._last_active = _monotonic()
        reader = self.reader
        bound = self.processor.frame_bound  # the largest request a registered application could take
        if bound is not None:
            bound = min(bound, self.server.limits.max_frame_bytes)
            if reader.max_frame_bytes != bound:
                reader.max_frame_bytes = bound
        items = reader.feed(data)
        # header_timeout_ms runs from the first byte of the frame that is still unfinished.
        if reader.mid_frame:
            if items or not self._partial_since:
                self._partial_since = now
        else:
            self._partial_since = 0.0
        if reader.skipped != self._junk_seen:
            self._throttle_junk(reader.skipped, now)
        self._process(items)
        held = reader.buffered
        if held != self._charged and not self._charge(held) and not self.closed:
            self._on_partial_budget(held)

    def _process(self, items, start: int = 0) -> None:
        """Answer frames in order; stop (keeping the rest) as soon as the client stops reading its replies.

        One read may bring thousands of small requests: answered all at once,
        their replies could pile up far past what the client takes before the
        transport can say so. Replies are written as they reach a few MiB, and
        once writing pauses the remaining frames wait in ``_backlog`` until the
        client reads again (:meth:`resume_writing`).
        """
        n = len(items)
        i = start
        route = self.processor.refusing_route
        if (route is not None and i < n and (self.allowed is None or route.name in self.allowed)
                and self.pending < self.max_pending):
            # admission refuses that application's queries at the moment: a read that starts with some
            # is refused up to its first other frame in one native pass, before any Python per frame
            out = bytearray()
            first = i
            i = self.processor.shed_run(route, items, i, out, self.inflight, EARLY_FLUSH_BYTES)
            if out:
                self._queue_refusals(route, out, i - first)
        while i < n:
            if self._pause_mask & PAUSED_WRITE or self.closed:
                if not self.closed:
                    self._backlog = items[i:]
                return
            item = items[i]
            i += 1
            if type(item) is int:
                reader = self.reader
                self._write_error(None, E.FrameTooLargeError(
                    f"frame of {item} bytes exceeds max_frame_bytes={reader.max_frame_bytes}"
                    + ("" if reader.max_frame_bytes == self.server.limits.max_frame_bytes else
                       " (the largest request any registered application can take; the port's limit is "
                       f"{self.server.limits.max_frame_bytes})")))
            else:
                self._on_frame(item)
                route = self._run
                if route is not None:  # the fast path admitted it: the same application's next frames
                    self._run = None   # in this read are taken in one pass while admission's bound holds
                    if (i < n and not self.closed and not self._pause_mask & PAUSED_WRITE
                            and (self.allowed is None or route.name in self.allowed)):
                        i = self.processor.admit_run(self, route, items, i)
                route = self._shedding
                if route is not None:  # admission refused it at the head: refuse the run that follows at once
                    self._shedding = None
                    if (i < n and (self.allowed is None or route.name in self.allowed)
                            and self.pending < self.max_pending):
                        out = bytearray()
                        first = i
                        i = self.processor.shed_run(route, items, i, out, self.inflight, EARLY_FLUSH_BYTES)
                        if out:
                            self._queue_refusals(route, out, i - first)

    def resume_writing(self) -> None:
        backlog = self._backlog
        if backlog is not None:  # the frames held back when the client stopped reading go first
            self._backlog = None
            self._stalled_since = 0.0
            self._pause_mask &= ~PAUSED_WRITE
            self._process(backlog)
            if self._pause_mask & PAUSED_WRITE or self.closed:
                return
            self._pause_mask |= PAUSED_WRITE  # so that the base resumes reading
        super().resume_writing()

    def _throttle_junk(self, skipped: int, now: float) -> None:
        """Oversized frames are skipped unread, but reading them still costs the loop: a client that
        streams them faster than ``JUNK_BYTES_PER_S`` is slowed down (its reading paused)."""
        junk = skipped - self._junk_seen
        self._junk_seen = skipped
        tokens = min(JUNK_BURST_BYTES, self._junk_tokens + (now - self._junk_at) * JUNK_BYTES_PER_S) - junk
        self._junk_tokens, self._junk_at = tokens, now
        if tokens < 0 and not self._pause_mask & PAUSED_JUNK and not self.closed:
            self._pause(PAUSED_JUNK)
            self.server.loop.call_later(-tokens / JUNK_BYTES_PER_S, self._resume, PAUSED_JUNK)

    def _on_partial_budget(self, held: int) -> None:
        """This connection's unfinished frame passes the frontend-wide budget: LIMIT_EXCEEDED, close."""
        exc = self._partial_refusal(held)
        self.reader = framing.FrameReader(self.server.limits.max_frame_bytes)  # its buffer goes now
        self.close_for("partial_budget", exc)

    def busy(self) -> bool:
        return self.pending > 0 or bool(self._out) or self.held_bytes > 0 or super().busy()

    def before_close(self) -> None:
        if self._out:
            self._flush()

    def on_header_timeout(self) -> None:
        ms = self.server.limits.header_timeout_ms
        self.reader = framing.FrameReader(self.server.limits.max_frame_bytes)
        self.close_for("header_timeout", E.LimitExceededError(
            f"no complete frame within header_timeout_ms={ms} of its first byte (or of the connection's start): "
            f"the connection is closed"))

    # ------------------------------------------------------------ requests
    def _on_frame(self, body) -> None:
        head = _request_head(body)  # PREDICT/FEEDBACK: kind, id and app from the bytes, nothing decoded
        if head is not None and self._answered_before_decoding(head, body):
            return
        try:
            msg = self.unpack(body)
        except E.ClipperError as exc:
            return self._write_error(None, exc)
        if type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int:
            return self._write_error(None, E.MalformedFrameError(
                "a message must be a msgpack array [type, id, ...] with an integer type"))
        req_id = msg[1]
        if type(req_id) is not int or req_id < 0:
            return self._write_error(None, E.MalformedFrameError(
                f"request id {_brief(req_id)} is not an unsigned integer"))
        if req_id in self.inflight:
            return self._write_error(req_id, self._duplicate(req_id))
        kind = msg[0]
        try:
            if kind == _PREDICT:
                if len(msg) < 4 or type(msg[2]) is not str:
                    raise E.MalformedFrameError("PREDICT is [1, id, app, input, options?] with app a string")
                allowed = self.allowed
                if allowed is not None and msg[2] not in allowed:
                    raise self._refused(msg[2])
                self._admit(req_id)
                try:
                    self.processor.predict(self, req_id, msg[2], msg[3], msg[4] if len(msg) > 4 else None)
                except BaseException:
                    self.pending -= 1
                    self.inflight.discard(req_id)
                    raise
            elif kind == wire.PING:
                self._write(wire.pong(req_id))
            elif kind == wire.DESCRIBE:
                if len(msg) != 3 or type(msg[2]) is not str:
                    raise E.MalformedFrameError("DESCRIBE is [4, id, app] with app a string")
                allowed = self.allowed
                if allowed is not None and msg[2] not in allowed:
                    raise self._refused(msg[2])
                route = self.processor.routes.get(msg[2])
                if route is None:
                    raise E.UnknownApplicationError(f"no application named {_brief(msg[2])} is registered")
                self._write(wire.description(req_id, route.describe()))
            elif kind == wire.HELLO:
                self._on_hello(req_id, msg)
            elif kind == wire.FEEDBACK:
                self._on_feedback(req_id, msg)
            else:
                raise E.UnknownMessageTypeError(
                    f"message type {kind} is not a request this server knows; expected one of "
                    f"{sorted(wire.REQUEST_TYPES)}")
        except E.ClipperError as exc:
            self._write_error(req_id, exc)
        except Exception as exc:  # a bug: fail the request, keep the connection
            log.exception("internal error on request %s", req_id)
            self._write_error(req_id, E.InternalError(f"{type(exc).__name__}: {exc}"))

    def _answered_before_decoding(self, head: tuple, body) -> bool:
        """Answer what can be answered from a frame's head alone, before its input is decoded.

        * A connection without the right API key is refused.
        * Admission: a query its model cannot serve in time is refused at once
          (``QueryProcessor.shed``), its input never decoded; under overload that
          keeps a refusal far cheaper than an answer, so the loop has room for the
          queries it admits.
        * An ndarray input of exactly the application's dtype and shape, ending
          the frame (``[1, id, app, x]``, no options: what the clients send), is
          taken as a view of the frame's bytes (``framing.array_input``; copied
          out instead when the read holds many other frames, which the view
          would pin) and the query started: nothing is decoded.
        * A nested-list input is walked in the frame's bytes against the
          application's shape (``framing.check_nested``): a list longer than the
          shape allows is refused as soon as its length is read, so a 15 MB frame
          of nested lists costs a scan, not a million Python objects.
        """
        kind, req_id, app, offset, is_list = head
        if req_id in self.inflight:
            self._write_error(req_id, self._duplicate(req_id))
            return True
        allowed = self.allowed
        if allowed is not None and app not in allowed:
            self._write_error(req_id, self._refused(app))
            return True
        route = self.processor.routes.get(app)
        if route is None or self.pending >= self.max_pending or self.processor.draining:
            return False  # (refused by the whole way, in the order of docs/protocol.md section 4)
        if kind == _PREDICT:
            frame = self.processor.shed(route, req_id, len(body), self)
            if frame is not None:
                self._queue_refusals(route, frame, 1)
                self._shedding = route  # the frames after it in this read may be refused in one run
                return True
            ext = route.ext_head
            if ext is not None and not is_list:
                # [1, id, app, x] with x an ndarray of exactly the application's dtype and shape: x is a
                # view of the frame's bytes, nothing decoded (anything else is decoded and judged in full)
                x = _array_input(body, offset, ext, route.np_dtype, route.shape)
                if x is not None:
                    # (the pending limit was checked above)
                    self.pending += 1
                    self.inflight.add(req_id)
                    try:
                        self.processor.predict_array(self, req_id, route, x)
                        self._run = route  # admitted: _process may take the frames after it in one run
                    except Exception as exc:
                        self.pending -= 1
                        self.inflight.discard(req_id)
                        if not isinstance(exc, E.ClipperError):  # a bug: fail the request, keep the connection
                            log.exception("internal error on request %s", req_id)
                            exc = E.InternalError(f"{type(exc).__name__}: {exc}")
                        self._write_error(req_id, exc)
                    return True
        if not is_list or route.np_dtype is None:
            return False
        bad = _check_nested(body, offset, route.shape, route.np_dtype.itemsize, route.max_input_bytes, route.int_app)
        if bad is None or bad[0] == 0:  # it passes (the decoder converts it), or for the full decoder to judge
            return False
        if kind == _PREDICT:
            route.requests += 1
            route.errors += 1
        self._write_error(req_id, route.nested_error(bad))
        return True

    def _admit(self, req_id: int) -> None:
        """Count one more PREDICT or FEEDBACK awaiting its reply, within max_pending_per_connection, and
        hold its id until the reply (the caller has checked that no request in flight holds it)."""
        if self.pending >= self.max_pending:
            raise E.LimitExceededError(
                f"{self.pending} requests are pending on this connection; "
                f"max_pending_per_connection is {self.max_pending}")
        self.pending += 1
        self.inflight.add(req_id)

    def _duplicate(self, req_id: int) -> E.ClipperError:
        return E.DuplicateRequestIdError(
            f"request id {req_id} is held by a request still awaiting its reply on this connection; "
            f"an id may be used again only once its reply has arrived")

    def _on_hello(self, req_id: int, msg: list) -> None:
        """HELLO (docs/protocol.md section 7): ``info`` a map with ``versions`` (required). The first
        HELLO answered HELLO_OK fixes the version; a later one (to authenticate again) must offer it."""
        if len(msg) < 3 or type(msg[2]) is not dict:
            raise E.MalformedFrameError("HELLO is [0, id, info] with info a map")
        opts = msg[2]
        if "versions" not in opts:
            raise E.MalformedFrameError("HELLO info lacks \"versions\" (required): an array of the protocol "
                                        "versions the client speaks")
        offered = opts["versions"]
        if type(offered) is not list:
            raise E.MalformedFrameError("HELLO versions must be an array of integers")
        # Only integers count: an array among them would compare elementwise.
        common = [v for v in offered if type(v) is int and v in wire.SUPPORTED_VERSIONS]
        if self.negotiated:
            if self.version not in common:
                raise E.UnsupportedVersionError(
                    f"this connection speaks protocol version {self.version} since its first HELLO; a later HELLO "
                    f"must offer it (it offers {_brief(offered)}); nothing was changed")
            common = [self.version]
        if not common:
            raise E.UnsupportedVersionError(
                f"client offers protocol versions {_brief(offered)}; this server speaks "
                f"{list(wire.SUPPORTED_VERSIONS)}")
        authenticated = None  # said in HELLO_OK only when the server requires API keys
        if self.server.api_keys is not None:
            if "api_key" in opts:
                self._authenticate(req_id, opts["api_key"])
                if self.closed:  # too many failed attempts: the connection is closing
                    return
            authenticated = self.grant is not None and not self.grant.revoked
        self.version = max(common)
        self.negotiated = True
        lim = self.server.limits
        self._write(wire.hello_ok(req_id, self.version, self.server.server_name, {
            "max_frame_bytes": lim.max_frame_bytes,
            "max_input_bytes": lim.max_input_bytes,
            "max_str_len": lim.max_str_len,
            "max_array_len": lim.max_array_len,
            "max_map_len": lim.max_map_len,
            "max_pending_per_connection": lim.max_pending_per_connection,
        }, authenticated))

    # ------------------------------------------------------------ API keys
    def _authenticate(self, req_id: int, key) -> None:
        """Take the grant of ``key`` (a HELLO's api_key), or raise AuthenticationError.

        A HELLO with a wrong key leaves the connection unauthenticated (even if
        an earlier HELLO had succeeded); after max_auth_failures_per_connection
        of them the connection is closed, the last ERROR written first.
        """
        grant = self.server.api_keys.verify(key)
        if grant is not None:
            self.grant = grant
            self.allowed = grant.apps  # the live set: revocation empties it under this connection
            return
        self.grant = None
        self.allowed = _NOT_AUTHENTICATED
        self.auth_failures += 1
        what = "is not a string" if type(key) is not str else "is not a valid API key (unknown or revoked)"
        limit = self.server.limits.max_auth_failures_per_connection
        if self.auth_failures < limit:
            raise E.AuthenticationError(f"HELLO api_key {what}; the connection is not authenticated")
        self._write_error(req_id, E.AuthenticationError(
            f"HELLO api_key {what}; {self.auth_failures} failed attempts reach max_auth_failures_per_connection="
            f"{limit}: the connection is closed"))
        self._flush()
        self.transport.close()
        self.closed = True
        # the frames still in this read are dropped, unanswered (the method swapped on this connection)
        self._on_frame = self._ignore_frame  # type: ignore[method-assign]

    def _ignore_frame(self, body) -> None:
        pass

    def _refused(self, app: str) -> E.ClipperError:
        """Why a query for ``app`` is refused on this connection (the slow path of the grant check)."""
        grant = self.grant
        if grant is None:
            return E.AuthenticationError("the server requires API keys: authenticate with HELLO info api_key "
                                         "before PREDICT or FEEDBACK")
        if grant.revoked:
            return E.AuthenticationError(f"the API key {grant.id} of this connection was revoked")
        return E.PermissionDeniedError(f"the API key {grant.id} does not grant application {_brief(app)}")

    def _on_feedback(self, req_id: int, msg: list) -> None:
        if len(msg) < 5 or type(msg[2]) is not str:
            raise E.MalformedFrameError("FEEDBACK is [2, id, app, input, label, options?] with app a string")
        allowed = self.allowed
        if allowed is not None and msg[2] not in allowed:
            raise self._refused(msg[2])
        self._admit(req_id)
        try:
            self.processor.feedback(self, req_id, msg[2], msg[3], msg[4], msg[5] if len(msg) > 5 else None)
        except BaseException:
            self.pending -= 1
            self.inflight.discard(req_id)
            raise

    # ------------------------------------------------------------ replies
    def send_result(self, req_id, query_id, output, is_default, extra) -> None:
        self.pending -= 1
        self.inflight.discard(req_id)
        if self.closed:
            return
        pack = self.pack
        try:
            # The message's frame in one native step; a route's constant extra is encoded already.
            frame = _result_frame(req_id, query_id, pack(output), is_default,
                                  None if extra is None else extra.packed if type(extra) is _PackedExtra
                                  else pack(extra))
        except (TypeError, ValueError, OverflowError) as exc:
            frame = framing.pack_frame(pack(wire.error(req_id, E.ModelError(
                f"the model's output cannot be encoded: {exc}"))))
        self._queue(frame)

    def send_feedback_ok(self, req_id, info: dict | None) -> None:
        self.pending -= 1
        self.inflight.discard(req_id)
        if not self.closed:
            self._write(wire.feedback_ok(req_id, info))

    def send_error(self, req_id, exc: E.ClipperError) -> None:
        self.pending -= 1
        self.inflight.discard(req_id)
        if not self.closed:
            self._write_error(req_id, exc)

    def _write_error(self, req_id, exc: E.ClipperError) -> None:
        self._write([_ERROR, req_id, exc.code, exc.name, exc.message])

    def _write(self, msg) -> None:
        if not self.closed:
            self._queue(framing.pack_frame(wire.pack(msg)))

    def _queue_refusals(self, route, frames: bytes | bytearray, n: int) -> None:
        """The answers to ``n`` queries admission refused at arrival for ``route`` (at their heads, or
        in a run): default outputs wait out the application's ``refusal_hold_ns``
        (``default_refusal_hold``) in the server's hold, and count in its latency as answered then, or
        at once when they are not held; OVERLOADED errors go like any reply."""
        if not route.default_on_overload:
            self._queue(frames)
            return
        hold = route.refusal_hold_ns
        if hold > 0 and self.server.hold(self, frames, hold):
            route.latency.count_at(hold, n)
            return
        self._queue(frames)
        route.latency.count_fast(n)

    def _queue(self, frame: bytes | bytearray) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes > EARLY_FLUSH_BYTES:
            self._flush()  # may pause writing (the client reads slower than it asks): _process stops there
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            server = self.server
            server.dirty.append(self)
            if not server.flush_pending:
                server.flush_pending = True
                server.loop.call_soon(server.flush_dirty)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        self._out_bytes = 0
        if not out or self.closed:
            out.clear()
            return
        self._out = []
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._pause_mask & PAUSED_WRITE:  # the client does not read: past max_unread_reply_bytes, cut it off
            self._check_unread()


class QueryServer(ClientServer):
    """Listens on the msgpack query port."""

    connection_class = QueryConnection
    interface = "msgpack"

    def __init__(self, loop, processor, limits, server_name: str, api_keys=None, partial_budget=None) -> None:
        """``api_keys``: the :class:`~clipper.security.ApiKeyRegistry` whose keys every
        PREDICT and FEEDBACK needs; None: no key needed. ``partial_budget``: the frontend's
        :class:`~clipper.server._connection.ByteBudget` of partial bytes (its own when None)."""
        super().__init__(loop, limits, partial_budget=partial_budget)
        self.processor = processor
        self.server_name = server_name
        self.api_keys = api_keys
        self.unpack = wire.make_unpacker(limits.decode_limits())
        self.packer = wire.new_packer()  # used on the event loop's thread only
        self.dirty: list[QueryConnection] = []  # connections with replies queued and not yet written
        self.flush_pending = False  # flush_dirty is scheduled
        # Default answers to refused queries, each held until its time (hold): (due in loop time, a
        # sequence number, the connection, the frames), earliest first; one timer for them all.
        self.held: list = []
        self.held_seq = 0
        self.held_timer = None
        self.held_due = 0.0  # when held_timer fires (loop time)
        self.holding = True  # False once a drain began: every answer goes at once
        # what a connection may have held at once; past it, its answers go at once (a client that floods)
        # (a quarter of max_unread_reply_bytes: released onto a write buffer at its high-water mark, half
        # of it, they stay under the limit that cuts a client off)
        self.max_held_bytes = max(1, limits.max_unread_reply_bytes // 4)

    def hold(self, conn: QueryConnection, frames: bytes | bytearray, delay_ns: int) -> bool:
        """Write ``frames`` (answers to queries refused at arrival, made now) to ``conn`` ``delay_ns``
        from now, with whatever else it has to write then; a closed connection never gets them, and a
        drain or close writes them all at once. False (nothing held: the caller writes them at once,
        under the port's usual back-pressure) once a drain began, while its client is not reading, or
        past ``max_held_bytes`` held for it (with what its transport has not sent yet)."""
        size = len(frames)
        transport = conn.transport
        if (not self.holding or conn._pause_mask & PAUSED_WRITE or transport is None
                or conn.held_bytes + size + transport.get_write_buffer_size() > self.max_held_bytes):
            return False
        conn.held_bytes += size
        due = self.loop.time() + delay_ns / 1e9
        self.held_seq += 1
        heapq.heappush(self.held, (due, self.held_seq, conn, frames))
        if self.held_timer is None or due < self.held_due:
            self._arm_held(due)
        return True

    def _arm_held(self, due: float) -> None:
        # (the time is kept here: uvloop's call_at gives a plain Handle, with no when(), for a time
        # under half a millisecond away)
        if self.held_timer is not None:
            self.held_timer.cancel()
        self.held_due = due
        self.held_timer = self.loop.call_at(due, self.release_held)

    def release_held(self, everything: bool = False) -> None:
        """Queue the held answers that are due (``everything``: all of them) for their connections."""
        if self.held_timer is not None:
            self.held_timer.cancel()
            self.held_timer = None
        held = self.held
        # (the loop's timers fire up to a millisecond early or late: what is due within it goes now)
        until = float("inf") if everything else self.loop.time() + 0.001
        try:
            while held and held[0][0] <= until:
                _, _, conn, frames = heapq.heappop(held)
                conn.held_bytes -= len(frames)
                if conn.closed:
                    continue
                try:
                    conn._queue(frames)  # (past EARLY_FLUSH_BYTES it writes at once)
                except Exception:  # as in flush_dirty: this connection is cut off, the others' answers go on
                    self._write_failed(conn)
        finally:
            if held:
                self._arm_held(held[0][0])

    def _write_failed(self, conn: QueryConnection) -> None:
        """A write to ``conn`` raised: it is cut off (closed and counted as ``write_failed``; its replies
        are lost and its client learns so at once)."""
        log.exception("writing the replies of a connection failed: closing it")
        if conn.transport is not None:
            try:
                conn.abort_for("write_failed")
            except Exception:
                log.exception("closing a connection whose write failed failed too")

    def stop_accepting(self) -> None:
        """As the base does; the answers held for refused queries go at once (a drain has begun)."""
        super().stop_accepting()
        self.holding = False
        self.release_held(everything=True)

    async def close(self) -> None:
        self.release_held(everything=True)
        self.flush_dirty()
        await super().close()

    def flush_dirty(self) -> None:
        """Write the replies every connection has queued: once per loop turn (scheduled by the first
        reply queued in it), or sooner, as soon as a batch's answers are all settled and nothing waits
        behind them (``ModelQueue``'s ``on_answered``): a query alone in flight then gets its answer
        before the frontend does its bookkeeping of the batch, not after it and a turn of the loop.
        Held answers to refusals that are due go in the same writes (under load they rarely wait for
        their own timer, which is for an idle loop)."""
        held = self.held
        if held and held[0][0] <= self.loop.time() + 0.001:
            self.flush_pending = True  # (what release_held queues is written below: no flush of its own)
            try:
                self.release_held()
            finally:
                self.flush_pending = False
        self.flush_pending = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for conn in dirty:
                if conn._flush_scheduled:  # (not flushed early since: past EARLY_FLUSH_BYTES)
                    try:
                        conn._flush()
                    except Exception:  # one connection's failure leaves the others' replies to go out
                        self._write_failed(conn)
