"""The asyncio client: many concurrent calls pipelined on one connection."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from time import perf_counter
from typing import Any, Callable, Iterable, Mapping, cast

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
    window_from,
)
from ._sync import _check_app, _make_opts

__all__ = ["AsyncClient", "ClientProtocol"]


class ClientProtocol(asyncio.Protocol):
    """The connection under :class:`AsyncClient`: splits the byte stream into
    frames and completes the future of each request id as its reply arrives.

    ``pending`` maps request id -> future. A future's result is the decoded
    reply message; it fails with a ClipperError when the server sent a frame
    no request can be matched with, or when the connection is lost.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frame_bytes: int, where: str) -> None:
        self._loop = loop
        self._where = where
        self._max_frame_bytes = max_frame_bytes
        self._reader = framing.FrameReader(max_frame_bytes)
        self._unpack = wire.make_unpacker(client_limits(max_frame_bytes))
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made, first
        self.pending: dict[int, asyncio.Future] = {}
        self.lost: E.ConnectionClosedError | None = None  # why the connection is gone, once it is
        self._closing_by_client = False
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future] = deque()
        self._closed = loop.create_future()

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_connection's: a stream transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass

    def data_received(self, data: bytes) -> None:
        unpack = self._unpack
        pending = self.pending
        for item in self._reader.feed(data):
            if type(item) is int:
                self._fail_all(E.FrameTooLargeError(
                    f"the server sent a frame of {item} bytes; this client's max_frame_bytes is "
                    f"{self._max_frame_bytes}"))
                continue
            try:
                msg = unpack(item)
            except E.ClipperError as exc:
                self._fail_all(exc)
                continue
            rid = reply_id(msg)
            if rid is None or rid is _NO_ID:
                self._fail_all(unattributed_error(msg))
                continue
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            # else: the late reply of a request that timed out or was cancelled.

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing_by_client:
            why = f"the connection to {self._where} was closed by the client"
        elif exc is None:
            why = f"the server at {self._where} closed the connection"
        else:
            why = f"the connection to {self._where} failed: {exc}"
        self.lost = E.ConnectionClosedError(why)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(E.ConnectionClosedError(why))
        self._wake_writers()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # ------------------------------------------------------------ used by AsyncClient
    def send(self, rid: int, data: bytes, on_done: Callable[[asyncio.Future], object] | None = None) -> asyncio.Future:
        """Write one request frame; return the future of its reply."""
        if self.lost is not None:
            raise E.ConnectionClosedError(str(self.lost.message))
        fut = self._loop.create_future()
        self.pending[rid] = fut
        fut.add_done_callback(self._make_forget(rid))
        if on_done is not None:
            fut.add_done_callback(on_done)
        self.transport.write(data)
        return fut

    def register(self, rid: int, on_done: Callable[[asyncio.Future], object] | None = None) -> asyncio.Future:
        """Like :meth:`send` without the write (the caller writes in bulk)."""
        if self.lost is not None:
            raise E.ConnectionClosedError(str(self.lost.message))
        fut = self._loop.create_future()
        self.pending[rid] = fut
        fut.add_done_callback(self._make_forget(rid))
        if on_done is not None:
            fut.add_done_callback(on_done)
        return fut

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise E.ConnectionClosedError(str(self.lost.message))
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high mark."""
        while self._write_paused and self.lost is None:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.lost is not None:
            raise E.ConnectionClosedError(str(self.lost.message))

    def close(self) -> None:
        self._closing_by_client = True
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # ------------------------------------------------------------ internals
    def _make_forget(self, rid: int) -> Callable[[asyncio.Future], None]:
        pending = self.pending

        def forget(fut: asyncio.Future) -> None:
            # A timed-out or cancelled request: stop waiting for its id, so its
            # late reply is dropped.
            if pending.get(rid) is fut:
                del pending[rid]

        return forget

    def _fail_all(self, exc: E.ClipperError) -> None:
        # The server could not tell which request a frame belonged to: every
        # request in flight gets the error, since any of them may be the one.
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(E.error_for_code(exc.code, exc.message))

    def _wake_writers(self) -> None:
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class AsyncClient:
    """An asyncio client for Clipper's msgpack query port.

    Create it with ``await AsyncClient.connect(host, port)``. Any number of
    tasks may ``await client.predict(...)`` at once: their requests are
    pipelined on the one connection and each reply completes the call with
    the same request id, in whatever order replies arrive.

    Errors the server reports raise the matching :mod:`clipper.errors` class.
    A call without an answer within its timeout raises
    :class:`~clipper.errors.ClientTimeoutError` (its late reply is dropped);
    cancelling a call abandons its request the same way. When the connection
    drops, every pending call fails with
    :class:`~clipper.errors.ConnectionClosedError`, as does every later call.

    Use as an async context manager to close the connection::

        async with await AsyncClient.connect("127.0.0.1", 1339) as client:
            p = await client.predict("digits", x)
    """

    def __init__(self, protocol: ClientProtocol, host: str, port: int, timeout: float | None) -> None:
        # Use AsyncClient.connect(); this only wires up a made connection.
        self._proto = protocol
        self._loop = asyncio.get_running_loop()
        self._encoder = RequestEncoder()
        self.host = host
        self.port = port
        self.timeout = timeout
        self.server_info: dict = {}
        self._slots = asyncio.Semaphore(DEFAULT_WINDOW)
        self._tls = False
        self._api_key: str | None = None

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = DEFAULT_QUERY_PORT,
        *,
        timeout: float | None = 10.0,
        connect_timeout: float | None = 5.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tls: bool | ssl.SSLContext = False,
        cafile: str | None = None,
        server_hostname: str | None = None,
        api_key: str | None = None,
    ) -> "AsyncClient":
        """Connect, say HELLO and check the server's HELLO_OK.

        Args:
            host, port: the frontend's query port (1339 by default).
            timeout: default seconds a call waits for its answer; ``None``
                waits without bound. Each call can override it.
            connect_timeout: seconds for the TCP connect, the TLS handshake
                and the HELLO exchange.
            max_frame_bytes: the largest reply frame this client accepts.
            tls, cafile, server_hostname: TLS, as for :class:`Client`.
            api_key: the API key sent in HELLO, as for :class:`Client`.

        Raises ``OSError`` when the TCP connection cannot be made,
        ``ClientTimeoutError`` when the connect or handshake is too slow,
        ``ConnectionClosedError`` when the TLS handshake fails (naming the
        host and why), ``AuthenticationError`` when the server refuses
        ``api_key``, and ``UnsupportedVersionError`` when no protocol version
        is shared.
        """
        timeout = check_timeout(timeout)
        connect_timeout = check_timeout(connect_timeout)
        tls_context = client_tls_context(tls, cafile)
        check_api_key(api_key)
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}"
        kw: dict[str, Any] = {}
        if tls_context is not None:
            kw = {"ssl": tls_context, "server_hostname": server_hostname or host}
            if connect_timeout is not None:
                kw["ssl_handshake_timeout"] = connect_timeout
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: ClientProtocol(loop, max_frame_bytes, where), host, port, **kw),
                connect_timeout,
            )
        except asyncio.TimeoutError:
            raise E.ClientTimeoutError(f"could not connect to {where} within {connect_timeout} s") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise tls_failure(exc, where) from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            if tls_context is None:
                raise
            raise tls_failure(exc, where) from exc
        self = cls(proto, host, port, timeout)
        self._tls = tls_context is not None
        self._api_key = api_key
        try:
            await self._handshake(connect_timeout)
        except BaseException:
            proto.close()
            raise
        return self

    # ------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._proto.lost is not None or self._proto._closing_by_client

    async def predict(
        self, app: str, x: Any, timeout: float | None = None, *, options: Mapping | None = None,
        user: str | None = None,
    ) -> Prediction:
        """Ask application ``app`` for a prediction on input ``x``.

        Inputs and options as for :meth:`Client.predict`. Returns a
        :class:`Prediction`; raises the server's error as its
        :mod:`clipper.errors` class, ``ClientTimeoutError`` or
        ``ConnectionClosedError``.
        """
        _check_app(app)
        self._check_open()
        rid = self._encoder.new_id()
        data = self._encoder.frame(wire.predict(rid, app, x, _make_opts(options, user)), "query")
        result = to_prediction(await self._call(rid, data, self._timeout(timeout)))
        if isinstance(result, E.ClipperError):
            raise result
        return result

    async def predict_many(
        self,
        app: str,
        xs: Iterable[Any],
        timeout: float | None = None,
        *,
        options: Mapping | None = None,
        user: str | None = None,
    ) -> list[Prediction | E.ClipperError]:
        """Ask for a prediction on each input of ``xs``, all pipelined.

        Returns one item per input, in input order: a :class:`Prediction` or
        the :class:`~clipper.errors.ClipperError` that request got (a server
        error; ``ClientTimeoutError`` when ``timeout`` ran out for the whole
        call; ``ConnectionClosedError`` when the connection dropped). Raises
        ``InvalidInputError`` before sending anything if an input cannot be
        encoded.
        """
        _check_app(app)
        self._check_open()
        timeout = self._timeout(timeout)
        opts = _make_opts(options, user)
        encoder = self._encoder
        requests = []
        for i, x in enumerate(xs):
            rid = encoder.new_id()
            requests.append((rid, encoder.frame(wire.predict(rid, app, x, opts), f"query at index {i}")))
        proto = self._proto
        slots = self._slots
        release = _releaser(slots)
        futs: list[asyncio.Future] = []
        batch: list[bytes] = []
        timer = None
        if timeout is not None:
            timer = self._loop.call_later(timeout, _expire_all, futs, timeout, self.host, self.port)
        try:
            for rid, data in requests:
                if slots.locked() or proto._write_paused:
                    if batch:
                        proto.write(b"".join(batch))
                        batch.clear()
                    await proto.drain()
                await slots.acquire()
                try:
                    futs.append(proto.register(rid, release))
                except BaseException:
                    slots.release()
                    raise
                batch.append(data)
            if batch:
                proto.write(b"".join(batch))
            replies = await asyncio.gather(*futs, return_exceptions=True)
        except E.ConnectionClosedError as exc:
            # Lost while still sending. The futures registered so far are done
            # (answered before the loss, or failed by connection_lost).
            replies = []
            for fut in futs:
                if fut.done() and not fut.cancelled():
                    replies.append(fut.exception() or fut.result())
                else:
                    replies.append(E.ConnectionClosedError(exc.message))
            replies += [E.ConnectionClosedError(exc.message) for _ in range(len(requests) - len(futs))]
        finally:
            if timer is not None:
                timer.cancel()
            for fut in futs:  # cancelled from outside: abandon what is left
                if not fut.done():
                    fut.cancel()
        out: list = []
        for reply in replies:
            if isinstance(reply, BaseException):
                out.append(reply)
            else:
                out.append(to_prediction(reply))
        return out

    async def feedback(
        self,
        app: str,
        x: Any,
        label: Any,
        timeout: float | None = None,
        *,
        options: Mapping | None = None,
        user: str | None = None,
    ) -> dict:
        """Tell application ``app`` the true ``label`` of input ``x`` (for
        ``user``'s policy state); returns what FEEDBACK_OK said once the server
        has learned from it (see :meth:`Client.feedback`). Raises like
        :meth:`predict`."""
        _check_app(app)
        self._check_open()
        rid = self._encoder.new_id()
        data = self._encoder.frame(wire.feedback(rid, app, x, label, _make_opts(options, user)), "feedback")
        reply = await self._call(rid, data, self._timeout(timeout))
        if isinstance(reply, E.ClipperError):
            raise reply
        info = feedback_info(reply)
        if isinstance(info, E.ClipperError):
            raise info
        return info

    async def ping(self, timeout: float | None = None) -> float:
        """Send PING, wait for PONG; return the round trip in seconds."""
        self._check_open()
        rid = self._encoder.new_id()
        data = self._encoder.frame(wire.ping(rid), "ping")
        start = perf_counter()
        reply = await self._call(rid, data, self._timeout(timeout))
        elapsed = perf_counter() - start
        err = check_reply(reply, wire.PONG)
        if err is not None:
            raise err
        return elapsed

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosedError."""
        self._proto.close()
        await self._proto.wait_closed()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncClient {self.host}:{self.port} {state}>"

    # ------------------------------------------------------------ internals
    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else check_timeout(timeout)

    def _check_open(self) -> None:
        if self.closed:
            raise E.ConnectionClosedError(f"the connection to {self.host}:{self.port} is closed")

    async def _call(self, rid: int, data: bytes, timeout: float | None) -> list:
        """Send one request and wait for its reply message (raises a
        ClipperError the connection reported for it)."""
        proto = self._proto
        if proto._write_paused:
            await proto.drain()
        slots = self._slots
        await slots.acquire()
        try:
            fut = proto.send(rid, data, _releaser(slots))
        except BaseException:
            slots.release()
            raise
        if timeout is None:
            return await fut
        timer = self._loop.call_later(timeout, _expire, fut, timeout, self.host, self.port)
        try:
            return await fut
        finally:
            timer.cancel()

    async def _handshake(self, timeout: float | None) -> None:
        rid = self._encoder.new_id()
        offered = wire.SUPPORTED_VERSIONS
        data = self._encoder.frame(wire.hello(rid, offered, CLIENT_NAME, self._api_key), "HELLO")
        try:
            reply = await self._call(rid, data, timeout)
        except (E.ConnectionClosedError, E.FrameTooLargeError) as exc:
            if self._tls:
                raise
            # A TLS port reads HELLO as a bad handshake: it closes, perhaps after an alert record.
            raise type(exc)(f"{exc.message} (if {self.host}:{self.port} is a TLS port, pass tls=True)") from None
        info = check_hello_ok(reply, offered)
        self.server_info = info
        self._slots = asyncio.Semaphore(window_from(info))
        self._encoder.max_frame_bytes = frame_limit_from(info)


def _releaser(slots: asyncio.Semaphore) -> Callable[[asyncio.Future], None]:
    def release(_fut: asyncio.Future) -> None:
        slots.release()

    return release


def _expire(fut: asyncio.Future, timeout: float, host: str, port: int) -> None:
    if not fut.done():
        fut.set_exception(E.ClientTimeoutError(f"no answer from {host}:{port} within {timeout} s"))


def _expire_all(futs: list, timeout: float, host: str, port: int) -> None:
    for fut in futs:
        _expire(fut, timeout, host, port)
