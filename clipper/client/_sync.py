"""The synchronous client: one blocking-style connection, pipelined within a call."""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from time import monotonic, perf_counter
from typing import Any, Iterable, Mapping

from .. import errors as E
from .._native import framing
from ..config import DEFAULT_QUERY_PORT
from ..protocol import wire
from ._common import (
    _NO_ID,
    CLIENT_NAME,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_WINDOW,
    Prediction,
    RequestEncoder,
    check_api_key,
    check_hello_ok,
    check_reply,
    check_timeout,
    client_limits,
    client_tls_context,
    feedback_info,
    frame_limit_from,
    reply_id,
    tls_failure,
    to_prediction,
    unattributed_error,
    user_options,
    window_from,
)

__all__ = ["Client"]

_RECV_BYTES = 256 * 1024
# Sent bytes are cut from the front of the output buffer once this many pile up.
_COMPACT_BYTES = 1024 * 1024
# TLS: at most this much per send() call. OpenSSL retries a write that would block with a buffer at least
# as long as before; a bounded slice keeps that so while the output buffer grows, and shows progress.
_TLS_SEND_BYTES = 256 * 1024
# TLS: records read per readable event before selecting again (the socket may hold many).
_TLS_READS_PER_EVENT = 64
_SSL_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Lost(Exception):
    """The connection is gone (internal signal inside ``_exchange``)."""


class Client:
    """A synchronous client for Clipper's msgpack query port.

    ``Client(host, port)`` connects, says HELLO and checks the server's
    HELLO_OK before it returns. One connection carries every call; calls from
    several threads are safe and take turns (a lock). Within one call,
    :meth:`predict_many` pipelines its requests and matches the replies by id,
    in whatever order they arrive.

    Errors the server reports raise the matching :mod:`clipper.errors` class
    (``UnknownApplicationError``, ``ShapeMismatchError``, ``ModelError``...).
    A call that gets no answer within its timeout raises
    :class:`~clipper.errors.ClientTimeoutError`; the connection stays usable
    and the late answer is discarded when it comes. Once the connection is
    closed (by :meth:`close` or by the server), every call raises
    :class:`~clipper.errors.ConnectionClosedError`.

    Args:
        host, port: the frontend's query port (1339 by default).
        timeout: default seconds a call waits for its answers; ``None`` waits
            without bound. Each call can override it.
        connect_timeout: seconds for the TCP connect, the TLS handshake and
            the HELLO exchange.
        max_frame_bytes: the largest reply frame this client accepts.
        tls: ``True`` to speak TLS, verifying the server's certificate
            against the system's CAs (or ``cafile``); or an
            :class:`ssl.SSLContext` to use as it is. Default: plain TCP.
        cafile: a PEM file of the CA(s) to trust instead of the system's
            (implies ``tls=True``).
        server_hostname: the name the server's certificate must carry
            (default ``host``; an IP address is checked against the
            certificate's IP entries).
        api_key: the API key sent in HELLO, for a server that requires
            them (``clipper api-key create``).

    Raises (from the constructor): ``OSError`` when the TCP connection cannot
    be made, :class:`~clipper.errors.ClientTimeoutError` when the connect or
    handshake is too slow, :class:`~clipper.errors.ConnectionClosedError`
    when the TLS handshake fails (an untrusted certificate, a port that does
    not speak TLS; the message names the host and why),
    :class:`~clipper.errors.AuthenticationError` when the server refuses
    ``api_key``, :class:`~clipper.errors.UnsupportedVersionError` when client
    and server share no protocol version.

    Use as a context manager to close the connection::

        with Client("127.0.0.1", 1339) as client:
            p = client.predict("digits", x)
            print(p.output, p.is_default)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_QUERY_PORT,
        timeout: float | None = 10.0,
        connect_timeout: float | None = 5.0,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tls: bool | ssl.SSLContext = False,
        cafile: str | None = None,
        server_hostname: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = check_timeout(timeout)
        connect_timeout = check_timeout(connect_timeout)
        tls_context = client_tls_context(tls, cafile)
        self._tls = tls_context is not None
        self._api_key = check_api_key(api_key)
        self._lock = threading.Lock()
        self._closed = False
        self._torn_down = False
        self._encoder = RequestEncoder()
        self._max_frame_bytes = max_frame_bytes
        self._reader = framing.FrameReader(max_frame_bytes)
        self._unpack = wire.make_unpacker(client_limits(max_frame_bytes))
        # Bytes queued for the socket. A call that times out may leave part of
        # a frame here; the next call sends it first, so the stream stays whole.
        self._out = bytearray()
        self._out_pos = 0
        self._window = DEFAULT_WINDOW
        self.server_info: dict = {}
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError:
            raise E.ClientTimeoutError(
                f"could not connect to {host}:{port} within {connect_timeout} s") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            # The handshake runs blocking, within the socket's connect timeout; then non-blocking like plain TCP.
            try:
                sock = tls_context.wrap_socket(sock, server_hostname=server_hostname or host)
            except TimeoutError:
                sock.close()
                raise E.ClientTimeoutError(
                    f"the TLS handshake with {host}:{port} did not finish within {connect_timeout} s") from None
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise tls_failure(exc, f"{host}:{port}") from exc
        sock.setblocking(False)
        self._sock = sock
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel_events = selectors.EVENT_READ
        try:
            with self._lock:
                self._handshake(connect_timeout)
        except BaseException:
            self._closed = True
            self._teardown()
            raise

    # ------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._closed

    def predict(
        self, app: str, x: Any, timeout: float | None = None, *, options: Mapping | None = None,
        user: str | None = None,
    ) -> Prediction:
        """Ask application ``app`` for a prediction on input ``x``.

        ``x`` is a numpy array (sent as is; its dtype and shape must be the
        application's), a (nested) list of numbers, ``bytes`` or ``str``,
        whichever the application takes. ``timeout`` overrides the client's
        default for this call. ``options`` is an optional map of request
        options (see docs/protocol.md); ``user`` names the end user whose
        selection-policy state the query uses (sent as ``options["user"]``;
        None: the application's shared state).

        Returns a :class:`Prediction`; raises the server's error as its
        :mod:`clipper.errors` class, ``ClientTimeoutError`` or
        ``ConnectionClosedError``.
        """
        _check_app(app)
        timeout = self._timeout(timeout)
        with self._lock:
            self._check_open()
            rid = self._encoder.new_id()
            data = self._encoder.frame(wire.predict(rid, app, x, _make_opts(options, user)), "query")
            reply = self._exchange([(rid, data)], timeout)[rid]
        result = reply if isinstance(reply, E.ClipperError) else to_prediction(reply)
        if isinstance(result, E.ClipperError):
            raise result
        return result

    def predict_many(
        self,
        app: str,
        xs: Iterable[Any],
        timeout: float | None = None,
        *,
        options: Mapping | None = None,
        user: str | None = None,
    ) -> list[Prediction | E.ClipperError]:
        """Ask for a prediction on each input of ``xs``, all pipelined.

        Every request is sent without waiting for the answers before it (at
        most the server's ``max_pending_per_connection`` in flight), and the
        answers are matched by request id in whatever order they arrive.

        Returns one item per input, in input order: a :class:`Prediction`, or
        the :class:`~clipper.errors.ClipperError` that request got (a server
        error, ``ClientTimeoutError`` when ``timeout`` ran out for the whole
        call first, ``ConnectionClosedError`` when the connection dropped).
        Raises ``InvalidInputError`` before sending anything if an input
        cannot be encoded, and ``ConnectionClosedError`` if the client is
        already closed.
        """
        _check_app(app)
        timeout = self._timeout(timeout)
        opts = _make_opts(options, user)
        with self._lock:
            self._check_open()
            encoder = self._encoder
            requests = []
            for i, x in enumerate(xs):
                rid = encoder.new_id()
                requests.append((rid, encoder.frame(wire.predict(rid, app, x, opts), f"query at index {i}")))
            replies = self._exchange(requests, timeout)
        out = []
        for rid, _ in requests:
            reply = replies[rid]
            out.append(reply if isinstance(reply, E.ClipperError) else to_prediction(reply))
        return out

    def feedback(
        self,
        app: str,
        x: Any,
        label: Any,
        timeout: float | None = None,
        *,
        options: Mapping | None = None,
        user: str | None = None,
    ) -> dict:
        """Tell application ``app`` the true ``label`` of input ``x``.

        ``user`` names whose policy state learns from it (None: the
        application's shared state). Returns once the server has updated the
        state (FEEDBACK_OK) with what it said: ``{"models": [...], "missing":
        [...]}`` (the models whose predictions the policy learned from, and
        those that did not answer), or ``{}``. Raises like :meth:`predict`.
        """
        _check_app(app)
        timeout = self._timeout(timeout)
        with self._lock:
            self._check_open()
            rid = self._encoder.new_id()
            data = self._encoder.frame(wire.feedback(rid, app, x, label, _make_opts(options, user)), "feedback")
            reply = self._exchange([(rid, data)], timeout)[rid]
        if isinstance(reply, E.ClipperError):
            raise reply
        info = feedback_info(reply)
        if isinstance(info, E.ClipperError):
            raise info
        return info

    def ping(self, timeout: float | None = None) -> float:
        """Send PING, wait for PONG; return the round trip in seconds."""
        timeout = self._timeout(timeout)
        with self._lock:
            self._check_open()
            rid = self._encoder.new_id()
            data = self._encoder.frame(wire.ping(rid), "ping")
            start = perf_counter()
            reply = self._exchange([(rid, data)], timeout)[rid]
            elapsed = perf_counter() - start
        _raise_unless(reply, wire.PONG)
        return elapsed

    def describe(self, app: str, timeout: float | None = None) -> dict:
        """DESCRIBE ``app``: its ``input_dtype`` (and ``wire_dtype``), ``input_shape`` (-1: any length),
        ``slo_ms``, ``output_kind``, ``default_output`` and ``linked_models``."""
        _check_app(app)
        timeout = self._timeout(timeout)
        with self._lock:
            self._check_open()
            rid = self._encoder.new_id()
            data = self._encoder.frame(wire.describe(rid, app), "describe")
            reply = self._exchange([(rid, data)], timeout)[rid]
        _raise_unless(reply, wire.DESCRIPTION)
        info = reply[2] if len(reply) > 2 else None
        if type(info) is not dict:
            raise E.MalformedFrameError("DESCRIPTION carries no map")
        return info

    def close(self) -> None:
        """Close the connection. A call in progress in another thread fails
        with ``ConnectionClosedError``; later calls raise it too. Idempotent."""
        self._closed = True
        try:
            # Wakes a thread waiting in select() without taking the lock.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._teardown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Client {self.host}:{self.port} {state}>"

    # ------------------------------------------------------------ internals
    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else check_timeout(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise E.ConnectionClosedError(f"the connection to {self.host}:{self.port} is closed")

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        try:
            self._sel.close()
        except Exception:  # pragma: no cover - selector already gone
            pass
        self._sock.close()

    def _handshake(self, timeout: float | None) -> None:
        rid = self._encoder.new_id()
        offered = wire.SUPPORTED_VERSIONS
        data = self._encoder.frame(wire.hello(rid, offered, CLIENT_NAME, self._api_key), "HELLO")
        reply = self._exchange([(rid, data)], timeout)[rid]
        if isinstance(reply, E.ClipperError):
            if not self._tls and isinstance(reply, (E.ConnectionClosedError, E.FrameTooLargeError)):
                # A TLS port reads HELLO as a bad handshake: it closes, perhaps after an alert record.
                raise type(reply)(f"{reply.message} (if {self.host}:{self.port} is a TLS port, pass tls=True)")
            raise reply
        info = check_hello_ok(reply, offered)
        self.server_info = info
        self._window = window_from(info)
        self._encoder.max_frame_bytes = frame_limit_from(info)

    def _exchange(self, requests: list, timeout: float | None) -> dict:
        """Send ``requests`` ([(id, frame bytes)]) and collect one reply per id.

        Returns {id: decoded reply message or ClipperError}. Ids still without
        an answer at the deadline get ClientTimeoutError and are abandoned:
        their late replies are dropped as they arrive (only this call's ids are
        ever awaited). Sending and receiving interleave, so a long pipeline
        cannot deadlock against a server that stops reading while its replies
        wait to be read.
        """
        deadline = None if timeout is None else monotonic() + timeout
        sock = self._sock
        sel = self._sel
        window = self._window
        n = len(requests)
        sent = 0
        waiting: set = set()
        replies: dict = {}
        failure = None
        try:
            while True:
                while sent < n and len(waiting) < window:
                    rid, data = requests[sent]
                    sent += 1
                    self._out += data
                    waiting.add(rid)
                if not waiting:
                    break
                if self._out_pos < len(self._out):
                    self._send_some()
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        failure = "timeout"
                        break
                if self._tls and sock.pending():  # type: ignore[attr-defined]  # an SSLSocket with _tls
                    # Plaintext TLS already decrypted: the socket may never become readable for it.
                    self._receive(waiting, replies)
                    continue
                events = selectors.EVENT_READ
                if self._out_pos < len(self._out):
                    events |= selectors.EVENT_WRITE
                if events != self._sel_events:
                    sel.modify(sock, events)
                    self._sel_events = events
                for _key, ev in sel.select(remaining):
                    if ev & selectors.EVENT_READ:
                        self._receive(waiting, replies)
        except _Lost as exc:
            failure = str(exc)
            self._closed = True
            self._teardown()
        if failure is not None:
            missing = [rid for rid, _ in requests if rid not in replies]
            for rid in missing:
                if failure == "timeout":
                    replies[rid] = E.ClientTimeoutError(
                        f"no answer from {self.host}:{self.port} within {timeout} s")
                else:
                    replies[rid] = E.ConnectionClosedError(failure)
        return replies

    def _send_some(self) -> None:
        out = self._out
        try:
            if self._tls:
                end = min(len(out), self._out_pos + _TLS_SEND_BYTES)
                with memoryview(out) as view, view[self._out_pos : end] as rest:
                    count = self._sock.send(rest)
            else:
                with memoryview(out) as view, view[self._out_pos :] as rest:
                    count = self._sock.send(rest)
        except (BlockingIOError, InterruptedError, *_SSL_WANT):
            # TLS: a record could not go whole (WANT_WRITE), or the session must read first (WANT_READ,
            # the selector watches reads anyway); the same bytes are offered again.
            return
        except OSError as exc:
            raise _Lost(self._lost_message(exc)) from None
        self._out_pos += count
        if self._out_pos == len(out):
            out.clear()
            self._out_pos = 0
        elif self._out_pos >= _COMPACT_BYTES:
            del out[: self._out_pos]
            self._out_pos = 0

    def _receive(self, waiting: set, replies: dict) -> None:
        sock = self._sock
        reads = 0
        while True:
            try:
                data = sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError, *_SSL_WANT):
                return  # TLS: a partial record (WANT_READ) is not data yet
            except OSError as exc:
                raise _Lost(self._lost_message(exc)) from None
            if not data:
                raise _Lost(self._lost_message(None))
            self._take(data, waiting, replies)
            if not self._tls:
                return
            # One TLS recv() returns at most one record (16 KiB): read on while the socket has more,
            # and always while the session holds decrypted bytes (no readable event would tell of them).
            reads += 1
            if reads >= _TLS_READS_PER_EVENT and not sock.pending():  # type: ignore[attr-defined]  # (TLS)
                return

    def _take(self, data: bytes, waiting: set, replies: dict) -> None:
        unpack = self._unpack
        for item in self._reader.feed(data):
            if type(item) is int:
                _fail_all(waiting, replies, E.FrameTooLargeError(
                    f"the server sent a frame of {item} bytes; this client's max_frame_bytes is "
                    f"{self._max_frame_bytes}"))
                continue
            try:
                msg = unpack(item)
            except E.ClipperError as exc:
                _fail_all(waiting, replies, exc)
                continue
            rid = reply_id(msg)
            if rid is None or rid is _NO_ID:
                _fail_all(waiting, replies, unattributed_error(msg))
            elif rid in waiting:
                waiting.discard(rid)
                replies[rid] = msg
            # else: the late reply of an abandoned request; dropped.

    def _lost_message(self, exc: OSError | None) -> str:
        if self._closed:
            return f"the connection to {self.host}:{self.port} was closed by the client"
        if exc is None:
            return f"the server at {self.host}:{self.port} closed the connection"
        return f"the connection to {self.host}:{self.port} failed: {exc}"


def _fail_all(waiting: set, replies: dict, exc: E.ClipperError) -> None:
    # The server could not tell which request a frame belonged to (or sent a
    # reply the client cannot attribute): every request in flight gets the
    # error, since any of them may be the one.
    for rid in waiting:
        replies[rid] = E.error_for_code(exc.code, exc.message)
    waiting.clear()


def _raise_unless(reply: list | E.ClipperError, expected: int) -> None:
    if isinstance(reply, E.ClipperError):
        raise reply
    err = check_reply(reply, expected)
    if err is not None:
        raise err


def _check_app(app: str) -> None:
    if type(app) is not str:
        raise TypeError(f"the application name must be a str, got {type(app).__name__}")


def _make_opts(options: Mapping | None, user: str | None = None) -> dict | None:
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping, got {type(options).__name__}")
    return user_options(options, user)
