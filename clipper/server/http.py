"""One HTTP/1.1 layer for the REST, admin and metrics ports, on :class:`ClientConnection`.

The parsing is httptools'; this layer keeps what every HTTP port needs, so that
the ports themselves are routers (``on_request``):

* a bounded head: while a request's line and headers are read, httptools is fed
  at most ``max_header_bytes`` (it would otherwise grow an unfinished header line
  without end); the request target is bounded by ``max_url_bytes``; connections
  that keep headers (:class:`HttpHeadersConnection`) count fields against
  ``max_header_fields``. Past a bound: 431 (414 for the target), and the
  connection closes.
* a bounded body: past the server's ``max_body_bytes`` it is dropped as it
  arrives (``body_too_large``; the router answers 413); the bytes of an
  unfinished body count against the frontend-wide ``max_partial_frame_bytes``.
* pipelining: replies go out in request order (:class:`HttpReply` slots); after a
  reply that closes the connection nothing more is parsed; at most
  ``max_pipelined_requests`` requests wait for their answers before reading pauses
  (the rest of the bytes already read wait, unparsed).
* flow control and timeouts as every client connection (``_connection.py``): a
  client that does not read is paused, then cut off (``max_unread_reply_bytes``
  counts the made replies waiting here as well as the transport's buffer); a
  request head (and the first byte of its body) must arrive within
  ``header_timeout_ms`` of the request's first byte, and the body within
  ``header_timeout_ms`` of its own first byte (408 otherwise).

Connection-level errors are answered, in order, with ``refusal(exc, status)`` (a
JSON error with the protocol's codes unless the port says otherwise) and close the
connection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import httptools
import orjson

from .. import errors as E
from ._connection import PAUSED_BACKLOG, PAUSED_CLOSING, PAUSED_WRITE, ClientConnection, ClientServer

log = logging.getLogger("clipper.http")

__all__ = ["HttpConnection", "HttpHeadersConnection", "HttpReply", "HttpServer", "REASONS", "clip", "http_status",
           "error_body"]

_monotonic = time.monotonic

REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
           415: "Unsupported Media Type", 421: "Misdirected Request", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}

MAX_URL_BYTES = 8192  # the request target
MAX_HEADER_FIELDS = 100  # header fields of one request, where a port keeps headers
MAX_MESSAGE_CHARS = 1024  # an error message sent to a client is cut here (client data in it is cut to 100)
_SLICE = 64 * 1024  # bytes fed to httptools at once when a read is larger (so the backlog bound can stop between)
_WRITE_BATCH = 256 * 1024  # replies joined into one write up to this size

_SERVING_UNAVAILABLE = (E.NoModelAvailableError, E.QueueFullError, E.DeadlineExceededError, E.OverloadedError,
                        E.ShuttingDownError, E.StateUnavailableError)


def clip(value, limit: int = 100) -> str:
    """Client data for an error message: its text (``str``, or ``bytes`` as latin-1), cut to ``limit``
    characters with a note of what was cut, so that no error echoes unbounded client data."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[:limit + 1]).decode("latin-1")
    elif not isinstance(value, str):
        value = repr(value)
    if len(value) <= limit:
        return value
    return value[:limit] + "...(cut)"


def http_status(exc: E.ClipperError) -> int:
    """The HTTP status of an error, by its branch of the error tree."""
    if isinstance(exc, E.UnknownApplicationError):
        return 404
    if isinstance(exc, E.AuthenticationError):
        return 401
    if isinstance(exc, E.PermissionDeniedError):
        return 403
    if isinstance(exc, E.FrameTooLargeError):
        return 413
    if isinstance(exc, E.UnsupportedMediaTypeError):
        return 415
    if isinstance(exc, E.MisdirectedRequestError):
        return 421
    if isinstance(exc, (E.RequestError, E.ProtocolError)):
        return 400
    if isinstance(exc, _SERVING_UNAVAILABLE):
        return 503
    return 500


def error_body(exc: E.ClipperError) -> dict:
    """``{"error": {"code", "name", "message"}, "cause": message}``; the message cut at MAX_MESSAGE_CHARS.

    ``cause`` is the original Clipper's key for the message (its users read it); ``error`` keeps the
    machine-readable code and name."""
    msg = exc.message
    if len(msg) > MAX_MESSAGE_CHARS:
        msg = msg[:MAX_MESSAGE_CHARS] + "...(cut)"
    return {"error": {"code": exc.code, "name": exc.name, "message": msg}, "cause": msg}


def original_error_body(exc: E.ClipperError) -> dict:
    """The original Clipper's error shape, ``{"error": NAME, "cause": message}``, plus ``code`` (for an
    application registered with ``rest_format = "original"``)."""
    body = error_body(exc)
    return {"error": exc.name, "cause": body["cause"], "code": exc.code}


def limit_error(status: int, message: str) -> E.LimitExceededError:
    """A LIMIT_EXCEEDED that answers with ``status`` (431 for a head, 414 for a target)."""
    exc = E.LimitExceededError(message)
    exc.http_status = status  # type: ignore[attr-defined]  # read with getattr (HttpConnection.fail, admin API)
    return exc


class _StopParsing(Exception):
    """Raised from a parser callback after a closing reply: httptools stops, nothing more is read."""


class HttpReply:
    """One request's place in its connection's reply order.

    ``data`` is None until the answer is made, then ``bytes`` or a tuple of
    ``bytes`` written in turn (a shared body is not copied per reply);
    ``close``: the connection ends after this reply.
    """

    __slots__ = ("data", "close")
    data: Any  # (see above: written as `type(d) is bytes` tests, which mypy does not narrow on)
    close: bool

    def __init__(self, close: bool = False) -> None:
        self.data = None
        self.close = close


class HttpServer(ClientServer):
    """A :class:`ClientServer` of HTTP connections.

    Subclasses set ``connection_class`` and ``max_body_bytes`` (after ``super().__init__``).
    """

    max_body_bytes = 1024 * 1024

    def __init__(self, loop, limits, **kw) -> None:
        super().__init__(loop, limits, **kw)
        self.max_head_bytes = limits.max_header_bytes
        self.max_pipelined = limits.max_pipelined_requests


class HttpConnection(ClientConnection):
    """One HTTP/1.1 connection: httptools parsing within bounds, replies in request order.

    A subclass routes each complete request in ``on_request(body, keep_alive)``
    (``self.url``, ``self.parser.get_method()``, ``body`` the list of its chunks, and
    ``self.body_too_large``): it takes a slot with :meth:`new_reply`, sets its
    ``data`` now or later, and calls :meth:`reply_ready`.
    """

    max_url_bytes = MAX_URL_BYTES

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server)
        self.parser = httptools.HttpRequestParser(self)
        self.replies: deque[HttpReply] = deque()
        self.url = b""
        self.body: list = []
        self.body_size = 0
        self.body_too_large = False
        self._max_head = server.max_head_bytes
        self._max_pipelined = server.max_pipelined
        self._in_head = True  # reading a request line and headers
        self._head_room = self._max_head
        self._closing = False  # a closing reply is queued: nothing more is parsed
        self._now = 0.0  # the time of the current read (one clock read per read, not per request)
        self._held = 0  # bytes of made replies not yet written (waiting for one before them)
        self._stash: bytes | None = None  # read and not parsed: reading paused for the backlog

    # ------------------------------------------------------------ to write in subclasses
    def on_request(self, body: list, keep_alive: bool) -> None:
        raise NotImplementedError

    def status_for(self, exc: E.ClipperError) -> int:
        return http_status(exc)

    def refusal(self, exc: E.ClipperError, status: int = 503) -> bytes:
        """A JSON error answer that closes the connection (503s say ``Retry-After: 1``)."""
        body = orjson.dumps(error_body(exc))
        retry = "Retry-After: 1\r\n" if status == 503 else ""
        return (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n").encode("latin-1") + body

    # ------------------------------------------------------------ transport
    def data_received(self, data) -> None:
        if self._closing:
            return
        if self._stash is not None:  # reading is paused; keep the order
            self._stash += data
            return
        self._now = self._last_active = _monotonic()
        n = len(data)
        try:
            if (n <= _SLICE and (not self._in_head or n <= self._head_room)
                    and len(self.replies) < self._max_pipelined):
                if self._in_head:
                    self._head_room -= n
                self.parser.feed_data(data)
            else:
                self._feed_slices(data)
        except httptools.HttpParserCallbackError as exc:
            self._parse_failed(exc.__context__)
        except httptools.HttpParserUpgrade:
            self._parse_failed(E.ProtocolError("HTTP upgrade is not supported"))
        except httptools.HttpParserError as exc:
            self._parse_failed(E.MalformedFrameError(f"the request is not valid HTTP/1.1: {clip(str(exc))}"))
        except E.ClipperError as exc:  # the head bound, from _feed_slices
            self._parse_failed(exc)
        held = self.body_size if self._partial_since and not self.body_too_large else 0
        if held != self._charged and not self._charge(held) and not self._closing:
            self.fail(503, self._partial_refusal(held), "partial_budget")

    def _feed_slices(self, data) -> None:
        """Feed a large read in slices: the head bound holds, and the backlog bound can stop between."""
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        parser = self.parser
        while pos < n and not self._closing:
            if len(self.replies) >= self._max_pipelined:  # the rest waits until answers go out
                self._stash = bytes(mv[pos:])
                self._pause(PAUSED_BACKLOG)
                return
            if self._in_head:
                room = self._head_room
                if room < 0:
                    raise self._head_too_large()
                # At least one byte: a head that ended exactly at the bound learns so from the next byte
                # (its body's first, which ends the head; see on_body), at the cost of one byte of slack.
                chunk = mv[pos:pos + max(1, min(room, _SLICE))]
                self._head_room = room - len(chunk)
            else:
                chunk = mv[pos:pos + _SLICE]
            pos += len(chunk)
            parser.feed_data(chunk)

    def _head_too_large(self) -> E.LimitExceededError:
        return limit_error(431, f"the request line and headers exceed max_header_bytes={self._max_head} bytes "
                                f"or {MAX_HEADER_FIELDS} fields")

    def _parse_failed(self, cause) -> None:
        if self._closing or isinstance(cause, _StopParsing):
            return
        if not isinstance(cause, E.ClipperError):  # a bug in a callback: fail the connection, say so
            log.error("internal error parsing an HTTP request", exc_info=cause)
            cause = E.InternalError(f"{type(cause).__name__}: {clip(str(cause))}")
        self.fail(getattr(cause, "http_status", None) or self.status_for(cause), cause)

    def busy(self) -> bool:
        return bool(self.replies) or self._stash is not None or super().busy()

    def unread_bytes(self) -> int:
        return self.transport.get_write_buffer_size() + self._held

    def on_header_timeout(self) -> None:
        ms = self.server.limits.header_timeout_ms
        what = "request head" if self._in_head else "request body"
        self.fail(408, E.LimitExceededError(
            f"no complete {what} within header_timeout_ms={ms}: the connection is closed"), "header_timeout")

    def fail(self, status: int, exc: E.ClipperError, reason: str | None = None) -> None:
        """A connection-level error: answered after the replies before it, then the connection closes.

        Nothing more is parsed or read; an unfinished body is dropped at once.
        """
        if self.closed:
            return
        if reason is not None:
            self.server.count_close(reason)
        self._partial_since = 0.0
        self.body = []
        self.body_size = 0
        self._stash = None
        if self._charged:
            self._charge(0)
        r = self.new_reply(HttpReply(close=True))
        r.data = self.refusal(exc, status)
        self.reply_ready(r)

    # ------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        if self._closing:
            raise _StopParsing
        self._partial_since = self._now

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_url_bytes:  # httptools stops: 414, close
            raise limit_error(414, f"the request target exceeds {self.max_url_bytes} bytes")
        self.url += url

    # No on_headers_complete here: httptools then makes no call into Python at the end of a head (the REST hot
    # path). The head ends at the body's first byte (on_body) or at the message's end; a subclass that needs
    # the headers at once defines on_headers_complete and calls _head_done.
    def _head_done(self) -> None:
        self._in_head = False
        self._partial_since = self._now  # the body (from its first byte) gets its own header_timeout_ms

    def on_body(self, body: bytes) -> None:
        if self._in_head:
            self._head_done()
        size = self.body_size + len(body)
        self.body_size = size
        if size > self.server.max_body_bytes:
            if not self.body_too_large:
                self.body_too_large = True
                self.body = []
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_room = self._max_head
        self._partial_since = 0.0
        body = self.body
        if body:
            self.body = []
        try:
            self.on_request(body, self.parser.should_keep_alive())
        finally:
            self.url = b""
            self.body_size = 0
            self.body_too_large = False

    # ------------------------------------------------------------ replies, in request order
    def new_reply(self, reply: HttpReply | None = None) -> HttpReply:
        """Take the next place in the reply order (``reply``, or a new :class:`HttpReply`)."""
        r = HttpReply() if reply is None else reply
        replies = self.replies
        replies.append(r)
        if r.close:  # nothing after a closing reply is parsed, nor read
            self._closing = True
            self._pause(PAUSED_CLOSING)
        elif len(replies) >= self._max_pipelined:
            self._pause(PAUSED_BACKLOG)
        return r

    def reply_ready(self, r: HttpReply) -> None:
        """``r.data`` is set: write it if its turn has come, else keep it (counted as unread)."""
        if self.closed:
            return
        d = r.data
        replies = self.replies
        if type(d) is bytes and len(replies) == 1 and replies[0] is r and not r.close:
            # The common case, one request at a time: write it now.
            replies.popleft()
            self.transport.write(d)
            if self._pause_mask:
                if self._pause_mask & PAUSED_WRITE:
                    self._check_unread()
                if self._pause_mask & PAUSED_BACKLOG and not self.closed:
                    self._resume(PAUSED_BACKLOG)
                    if self._stash is not None:
                        self.server.loop.call_soon(self._feed_stash)
            return
        self._held += len(d) if type(d) is bytes else sum(map(len, d))
        if replies and replies[0] is r:
            self.flush()
        elif self._held > self.server.max_unread_bytes:
            self.abort_for("unread_replies")

    def flush(self) -> None:
        """Write every made reply at the head of the order."""
        replies = self.replies
        if self.closed:
            replies.clear()
            return
        out: list = []
        size = 0
        while replies and replies[0].data is not None:
            r = replies.popleft()
            d = r.data
            if type(d) is bytes:
                out.append(d)
                n = len(d)
            else:
                out.extend(d)
                n = sum(map(len, d))
            size += n
            self._held -= n
            if r.close:
                self._write(out, size)
                if not self.closed:
                    self._close_after_reply()
                return
            if size >= _WRITE_BATCH:
                self._write(out, size)
                if self.closed:
                    return
                out = []
                size = 0
        if out:
            self._write(out, size)
        if self._pause_mask & PAUSED_BACKLOG and len(replies) <= self._max_pipelined // 2 and not self.closed:
            self._resume(PAUSED_BACKLOG)
            if self._stash is not None:
                self.server.loop.call_soon(self._feed_stash)

    def _write(self, out: list, size: int) -> None:
        transport = self.transport
        if len(out) == 1:
            transport.write(out[0])
        elif size < 65536:
            transport.write(b"".join(out))
        else:  # large bodies are not copied into one
            transport.writelines(out)
        if self._pause_mask & PAUSED_WRITE:
            self._check_unread()
            if self.closed:
                self.replies.clear()

    def _close_after_reply(self) -> None:
        self.replies.clear()
        self.closed = True
        self._closed_at = _monotonic()
        if self._charged:
            self._charge(0)
        if self._pause_mask & PAUSED_WRITE:  # the client does not read: the rest would never go
            self.transport.abort()
        else:
            self.transport.close()

    def _feed_stash(self) -> None:
        data, self._stash = self._stash, None
        if data is not None and not self.closed:
            self.data_received(data)


class HttpHeadersConnection(HttpConnection):
    """An :class:`HttpConnection` that keeps the request headers named in ``wanted_headers``.

    A separate class because httptools calls ``on_header`` (and builds each
    header's bytes) only on a protocol that has it: the plain REST port parses
    no header at all. ``headers`` maps the wanted names to their raw values;
    ``repeated_header`` names one that came twice (ambiguous: routers refuse it).
    """

    wanted_headers: dict[bytes, str] = {}
    max_header_fields = MAX_HEADER_FIELDS

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server)
        self.headers: dict[str, bytes] = {}
        self.repeated_header: str | None = None
        self._header_fields = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.headers = {}
        self.repeated_header = None
        self._header_fields = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        n = self._header_fields = self._header_fields + 1
        if n > self.max_header_fields:
            raise self._head_too_large()
        key = self.wanted_headers.get(name.lower())
        if key is not None:
            if key in self.headers:
                self.repeated_header = key
            self.headers[key] = value
