"""The bare floor: a minimal uvloop server speaking Clipper's msgpack protocol.

For every PREDICT it decodes the whole body with the wire unpacker (so the
input ndarray is decoded exactly as the real server decodes it) and answers
``RESULT [65, id, query_id, 0.0, False]`` -- the shape of Clipper's no-op
answer. There is no model, no queue and no batching: whatever Clipper adds on
top of this is its own cost.

Requests are pipelined; the replies to everything one ``data_received`` call
completed go out in one write.

    python -m bench.echo_server --port 0 --ready-file /tmp/echo.json

``--http`` serves the REST path's floor instead: HTTP/1.1 keep-alive parsed by
httptools, each JSON body decoded with orjson and answered with the shape of
Clipper's REST no-op answer (:class:`HttpEchoProtocol`).

The ready file gets ``{"query_port": int, "pid": int}`` (the keys Clipper's
ready file uses). SIGTERM or SIGINT stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys

import uvloop

from clipper._native import framing as _framing
from clipper.errors import ClipperError, FrameTooLargeError, UnknownMessageTypeError
from clipper.protocol import wire

# The native framing or its pure twin, as CLIPPER_NO_EXTENSIONS says.
FrameReader = _framing.FrameReader
pack_frame = _framing.pack_frame

__all__ = ["EchoProtocol", "HttpEchoProtocol", "serve", "main"]

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# Pause reading while this many reply bytes wait to be sent (bounded memory).
HIGH_WATER_BYTES = 4 * 1024 * 1024


class EchoProtocol(asyncio.Protocol):
    """One client connection: decode every frame, answer each PREDICT with 0.0."""

    __slots__ = ("_transport", "_reader", "_unpack", "_query_ids")

    def __init__(self, unpack, query_ids) -> None:
        self._transport = None
        self._reader = FrameReader(DEFAULT_MAX_FRAME_BYTES)
        self._unpack = unpack
        self._query_ids = query_ids  # one counter shared by all connections

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)

    def connection_lost(self, exc) -> None:
        self._transport = None

    def pause_writing(self) -> None:
        # The client does not read its replies fast enough: stop reading its
        # requests until the buffer drains, instead of buffering without bound.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data) -> None:
        unpack = self._unpack
        out = []
        for body in self._reader.feed(data):
            if type(body) is int:
                exc = FrameTooLargeError(
                    f"frame of {body} bytes exceeds the {DEFAULT_MAX_FRAME_BYTES}-byte limit"
                )
                out.append(pack_frame(wire.pack(wire.error(None, exc))))
                continue
            try:
                msg = unpack(body)
                kind = msg[0]
                req_id = msg[1]
            except ClipperError as exc:
                out.append(pack_frame(wire.pack(wire.error(None, exc))))
                continue
            except (TypeError, IndexError, KeyError):
                exc = UnknownMessageTypeError("a message must be a msgpack array [type, id, ...]")
                out.append(pack_frame(wire.pack(wire.error(None, exc))))
                continue
            if kind == wire.PREDICT:
                qid = next(self._query_ids)
                out.append(pack_frame(wire.pack([wire.RESULT, req_id, qid, 0.0, False])))
            elif kind == wire.PING:
                out.append(pack_frame(wire.pack(wire.pong(req_id))))
            elif kind == wire.HELLO:
                reply = wire.hello_ok(req_id, wire.PROTOCOL_VERSION, "bench-echo", {})
                out.append(pack_frame(wire.pack(reply)))
            else:
                exc = UnknownMessageTypeError(f"message type {kind!r} is not served by the echo floor")
                out.append(pack_frame(wire.pack(wire.error(req_id, exc))))
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


class HttpEchoProtocol(asyncio.Protocol):
    """The REST path's floor: one keep-alive HTTP/1.1 connection parsed by httptools; every request's
    JSON body is decoded with orjson (as Clipper's REST port decodes it) and answered ``{"query_id": n,
    "output": 0.0, "default": false}``, the shape of Clipper's no-op answer. The replies to everything
    one ``data_received`` call completed go out in one write."""

    def __init__(self, query_ids) -> None:
        import httptools

        self._transport = None
        self._parser = httptools.HttpRequestParser(self)
        self._error = httptools.HttpParserError
        self._query_ids = query_ids
        self._body: list = []
        self._out: list = []

    def connection_made(self, transport) -> None:
        self._transport = transport

    def connection_lost(self, exc) -> None:
        self._transport = None

    def data_received(self, data) -> None:
        try:
            self._parser.feed_data(data)
        except self._error:
            self._out.append(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            if self._transport is not None:
                self._transport.write(b"".join(self._out))
                self._transport.close()
            return
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._body.clear()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        import orjson

        try:
            doc = orjson.loads(b"".join(self._body)) if self._body else None
            ok = type(doc) is dict and "input" in doc
        except orjson.JSONDecodeError:
            ok = False
        if ok:
            reply = b'{"query_id":%d,"output":0.0,"default":false}' % next(self._query_ids)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        else:
            reply = b'{"error":"the body must be a JSON object with an input"}'
            head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        self._out.append(head % len(reply) + reply)


async def serve(host: str, port: int, ready_file: str | None, stop: asyncio.Event, http: bool = False) -> None:
    """Serve the msgpack echo floor (``http``: the HTTP/JSON one) until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    unpack = wire.make_unpacker(wire.DecodeLimits(max_frame_bytes=DEFAULT_MAX_FRAME_BYTES))
    query_ids = itertools.count(1)
    factory = (lambda: HttpEchoProtocol(query_ids)) if http else (lambda: EchoProtocol(unpack, query_ids))
    server = await loop.create_server(factory, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready_file:
        tmp = f"{ready_file}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"query_port": bound, "pid": os.getpid()}, fh)
        os.replace(tmp, ready_file)  # readers never see a half-written file
    print(f"echo server listening on {host}:{bound}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 binds a free port")
    ap.add_argument("--ready-file", help="write {'query_port', 'pid'} here once listening")
    ap.add_argument("--http", action="store_true",
                    help="the REST floor: HTTP/1.1 with JSON bodies (httptools, orjson) instead of msgpack")
    args = ap.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.ready_file, stop, http=args.http)

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
