"""What every client connection of the frontend shares: the connection limit, flow control and TLS."""

from __future__ import annotations

import asyncio

from .. import errors as E

__all__ = ["ClientConnection", "ClientServer"]


class ClientServer:
    """A listening socket on the frontend's loop whose connections are ``connection_class(self)``.

    Subclasses set ``connection_class`` and, before :meth:`start`, ``loop``,
    ``limits`` and ``connections`` (a set the connections keep themselves in).
    """

    connection_class: type = None
    _server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl=None) -> int:
        """Listen; returns the bound port (``port`` 0 binds a free one).

        With ``ssl`` (a server-side :class:`ssl.SSLContext`) every connection
        is TLS; a client that has not finished its handshake within
        ``limits.tls_handshake_timeout_ms`` is dropped. Connections are made
        (and count against ``max_connections``) once their handshake is done.
        """
        tls = {} if ssl is None else {"ssl": ssl, "ssl_handshake_timeout": self.limits.tls_handshake_timeout_ms / 1000}
        self._server = await self.loop.create_server(lambda: self.connection_class(self), host, port, backlog=1024,
                                                     **tls)
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listening socket; the connections already open go on (a drain answers them)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None


class ClientConnection(asyncio.Protocol):
    """Base of the msgpack and REST connections.

    ``server`` has ``connections`` (a set) and ``limits``. A connection past
    ``max_connections`` gets ``refusal(exc)`` written and is closed; a client
    that does not read its answers stops being read once
    ``max_write_buffer_bytes`` of them wait (no unbounded buffering).
    """

    def __init__(self, server) -> None:
        self.server = server
        self.transport = None
        self.closed = False
        self._reading_paused = False

    def refusal(self, exc: E.ClipperError) -> bytes:
        """The bytes that tell a client it is over the connection limit."""
        raise NotImplementedError

    def connection_made(self, transport) -> None:
        self.transport = transport
        srv = self.server
        limits = srv.limits
        if len(srv.connections) >= limits.max_connections:
            transport.write(self.refusal(E.LimitExceededError(
                f"the server has {len(srv.connections)} open connections; "
                f"max_connections is {limits.max_connections}")))
            transport.close()
            self.closed = True
            return
        srv.connections.add(self)
        transport.set_write_buffer_limits(high=limits.max_write_buffer_bytes)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
