"""The long protocol fuzz run: millions of inputs against the query port's decode path.

    python -m bench.fuzz_protocol --engine auto --seconds 600 --out bench/results/fuzz-protocol.json
    python -m bench.fuzz_protocol --mode live --seconds 120

Two targets:

``inproc`` (default)
    A real :class:`~clipper.server.query_server.QueryConnection` of a real
    :class:`~clipper.server.query_server.QueryServer` with a real
    :class:`~clipper.query.processor.QueryProcessor` (applications of every input
    kind, the prediction cache, a real :class:`~clipper.query.batching.ModelQueue`
    whose one replica is an in-process row-sum model, an Exp4 ensemble that
    learns from feedback), on an asyncio loop stepped by hand after each input
    (its ready callbacks only: replies are flushed, batches answered). Each input is a byte stream fed
    to a fresh connection through ``data_received``; the transport is a stub
    that records what is written (a stub is acceptable here: the target is the
    decoder and dispatch, not the socket). Fast: no syscalls per input.
``live``
    A ``clipper start`` subprocess with a real container; each input goes over a
    socket (a stream that is whole frames on one persistent connection followed
    by a PING, a broken stream on a connection of its own), slower but end to end.

Every input is checked: ``data_received`` never raises, the loop reports no
error, every reply is a well-formed RESULT / ERROR / PONG / HELLO_OK /
FEEDBACK_OK with a known code (and never ``INTERNAL_ERROR``), each frame gets
exactly one reply, and every query is answered by its deadline. A failed check
is a *finding*: its input is written to ``--findings-dir`` as a reproducer.

Engines: ``atheris`` (libFuzzer, coverage-guided over the instrumented Python
of ``clipper``, with a structure-aware custom mutator) when ``import atheris``
works (``pip install atheris``), else ``mutate``: a hand-rolled loop over the
same mutator (msgpack-aware field replacement, frame-level edits, byte-level
edits) from the seeds in ``tests/vectors``. ``--engine auto`` picks the first
that works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from clipper import errors as E
from clipper._native import framing
from clipper.protocol import wire

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"
MAX_FRAME = 64 * 1024  # the fuzzed server's max_frame_bytes: oversized frames are cheap
MAX_LEN = 4096  # the largest input the engines make


# ------------------------------------------------------------------ reply checks (shared with the tests)
def _all_codes() -> dict[int, str]:
    out, stack = {}, [E.ClipperError]
    while stack:
        cls = stack.pop()
        out[cls.code] = cls.name
        stack.extend(cls.__subclasses__())
    return out


KNOWN_CODES = _all_codes()
REPLY_TYPES = {wire.HELLO_OK, wire.RESULT, wire.FEEDBACK_OK, wire.PONG, wire.DESCRIPTION, wire.ERROR}


class Finding(AssertionError):
    """A fuzz input broke a rule of the protocol or the server."""


# Bugs this fuzzer found that are not fixed yet: (name, a substring of the INTERNAL_ERROR message). A long
# run counts them (``known_findings``) instead of stopping at the first one, so it can find others.
# Reproducers: bench/results/fuzz-findings/.
# Findings not fixed yet, so a long run counts them and goes on: (name, a words of the error message).
# (hello-versions-ndarray, the first finding, is fixed: tests/test_fuzz_protocol.py keeps it.)
KNOWN_BUGS: list[tuple[str, str]] = []


def known_bug(msg) -> str | None:
    """The name of the known bug an INTERNAL_ERROR reply ``msg`` shows, or None."""
    if isinstance(msg, list) and len(msg) == 5 and msg[0] == wire.ERROR and msg[2] == E.InternalError.code:
        for name, needle in KNOWN_BUGS:
            if isinstance(msg[4], str) and needle in msg[4]:
                return name
    return None


def check_reply(msg, sent_ids: set) -> None:
    """Raise :class:`Finding` unless ``msg`` is a well-formed reply to one of ``sent_ids`` (or a nil-id ERROR)."""
    if not (isinstance(msg, list) and len(msg) >= 2):
        raise Finding(f"a reply must be an array [type, id, ...]: {msg!r}")
    kind, rid = msg[0], msg[1]
    if kind not in REPLY_TYPES:
        raise Finding(f"unknown reply type {kind!r}: {msg!r}")
    if kind == wire.ERROR:
        if len(msg) != 5:
            raise Finding(f"ERROR with {len(msg)} elements: {msg!r}")
        if not (rid is None or rid in sent_ids):
            raise Finding(f"ERROR id {rid!r} was not sent")
        code, name, text = msg[2], msg[3], msg[4]
        if code not in KNOWN_CODES or name != KNOWN_CODES[code] or not isinstance(text, str):
            raise Finding(f"ERROR with an unknown code or name: {msg!r}")
        if code == E.InternalError.code:
            raise Finding(f"INTERNAL_ERROR: {msg!r}")
        return
    if type(rid) is not int or rid not in sent_ids:
        raise Finding(f"reply id {rid!r} was not sent: {msg!r}")
    if kind == wire.RESULT:
        if not (len(msg) in (5, 6) and type(msg[2]) is int and type(msg[4]) is bool
                and (len(msg) == 5 or isinstance(msg[5], dict))):
            raise Finding(f"malformed RESULT: {msg!r}")
    elif kind == wire.PONG:
        if len(msg) != 2:
            raise Finding(f"malformed PONG: {msg!r}")
    elif kind == wire.HELLO_OK:
        if not (len(msg) == 3 and isinstance(msg[2], dict) and "version" in msg[2]):
            raise Finding(f"malformed HELLO_OK: {msg!r}")
    elif kind == wire.DESCRIPTION:
        if not (len(msg) == 3 and isinstance(msg[2], dict) and "input_dtype" in msg[2]):
            raise Finding(f"malformed DESCRIPTION: {msg!r}")
    elif kind == wire.FEEDBACK_OK and len(msg) not in (2, 3):
        raise Finding(f"malformed FEEDBACK_OK: {msg!r}")


def split_frames(data: bytes, max_frame: int = MAX_FRAME) -> tuple[list, int]:
    """What the server's frame reader makes of ``data``: (items, bytes left in an unfinished frame)."""
    reader = framing.FrameReader(max_frame)
    items = list(reader.feed(data))
    consumed = sum(4 + (len(b) if type(b) is not int else 0) for b in items)
    return items, len(data) - consumed


def head_id(body: bytes):
    """The request id a frame's head carries: the second element of a body that starts as an array
    ``[int type, int id, ...]``, whatever follows (a server may answer a request it can attribute even
    when the rest of the frame does not decode); else None."""
    u = msgpack.Unpacker(strict_map_key=False, ext_hook=lambda c, d: None, raw=True)
    u.feed(body)
    try:
        if u.read_array_header() < 2:
            return None
        kind, rid = u.unpack(), u.unpack()
    except Exception:  # not an array, or a head that does not decode: no id to attribute
        return None
    return rid if type(kind) is int and type(rid) is int else None


def request_ids(items: list) -> set:
    """The ids a reply may carry for these frames (the items of :func:`split_frames`)."""
    out = set()
    for body in items:
        if type(body) is not int:
            rid = head_id(body)
            if rid is not None:
                out.add(rid)
    return out


# ------------------------------------------------------------------ the mutator
APP = "fz"
APPS = [APP, "fz-exp4", "fz-bytes", "fz-str", "nope"]
INTERESTING_INTS = [0, 1, -1, 2**7, 2**8, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                    2**64 - 1, -(2**31), -(2**63)]
INTERESTING_LENGTHS = [0, 1, 3, 4, 5, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, 2**31, 2**32 - 1]


def random_value(rng: random.Random, depth: int = 0):
    """An arbitrary msgpack value, with the forms the protocol forbids now and then."""
    r = rng.random()
    if depth > 3 or r < 0.55:
        k = rng.randrange(12)
        if k == 0:
            return None
        if k == 1:
            return rng.random() < 0.5
        if k == 2:
            return rng.choice(INTERESTING_INTS)
        if k == 3:
            return rng.randrange(-1000, 1000)
        if k == 4:
            return rng.choice([0.0, -0.0, 1.5, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324])
        if k == 5:
            return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)]))
                           for _ in range(rng.randrange(0, 12)))
        if k == 6:
            return rng.randbytes(rng.randrange(0, 24))
        if k == 7:
            return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 16)))
        if k == 8:
            return msgpack.ExtType(wire.EXT_NDARRAY, rng.randbytes(rng.randrange(0, 40)))
        if k == 9:
            dt = rng.choice(sorted(wire.ALLOWED_DTYPES))
            shape = tuple(rng.randrange(0, 5) for _ in range(rng.randrange(0, 4)))
            return np.zeros(shape, dtype=wire.ALLOWED_DTYPES[dt])
        if k == 10:
            return np.asarray([rng.uniform(-5, 5) for _ in range(4)], dtype="<f4")
        return rng.choice(APPS)
    if r < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    if r < 0.95:
        return {random_value(rng, 4) if rng.random() < 0.1 else rng.choice(["user", "versions", "client", "api_key",
                                                                          "x", ""]): random_value(rng, depth + 1)
                for _ in range(rng.randrange(0, 4))}
    x = [1.0]
    for _ in range(rng.randrange(2, 80)):
        x = [x]
    return x


def good_input(rng: random.Random):
    k = rng.randrange(4)
    if k == 0:
        return np.asarray([rng.uniform(-5, 5) for _ in range(4)], dtype="<f4")
    if k == 1:
        return [rng.uniform(-5, 5) for _ in range(4)]
    if k == 2:
        return [rng.randrange(-100, 100) for _ in range(4)]
    return [rng.uniform(-5, 5) for _ in range(rng.randrange(0, 8))]


def seed_messages(rng: random.Random) -> list:
    """Valid (or nearly valid) requests of every type, for every application."""
    rid = rng.randrange(0, 2**32)
    app = rng.choice(APPS)
    x = (rng.randbytes(rng.randrange(0, 8)) if app == "fz-bytes" else
         "".join(rng.choice("abcé") for _ in range(rng.randrange(0, 8))) if app == "fz-str" else good_input(rng))
    opts = {"user": rng.choice(["", "u1", "u2", "x" * 300])} if rng.random() < 0.2 else None
    k = rng.randrange(5)
    if k == 0:
        return wire.hello(rid, [rng.choice([0, 1, 2])], "fuzz")
    if k == 1:
        return wire.ping(rid)
    if k == 2:
        return wire.feedback(rid, app, x, rng.choice([0, 1, 2.5, "a", [1.0, 2.0]]), opts)
    return wire.predict(rid, app, x, opts)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def seeds() -> list[bytes]:
    out = [p.read_bytes() for p in sorted(VECTORS.glob("*.bin"))]
    rng = random.Random(0)
    for _ in range(64):
        out.append(b"".join(frame(wire.pack(seed_messages(rng))) for _ in range(rng.randrange(1, 4))))
    return out


def mutate_message(msg, rng: random.Random):
    if not isinstance(msg, list) or not msg:
        return random_value(rng) if rng.random() < 0.5 else seed_messages(rng)
    msg = list(msg)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op <= 1:
            msg[rng.randrange(len(msg))] = random_value(rng)
        elif op == 2 and len(msg) > 1:
            del msg[rng.randrange(1, len(msg)):]
        elif op == 3:
            msg.append(random_value(rng))
        elif op == 4:
            msg[0] = rng.choice([rng.randrange(0, 5), rng.randrange(0, 256), rng.choice(INTERESTING_INTS)])
        else:
            msg[min(1, len(msg) - 1)] = rng.choice(INTERESTING_INTS + [rng.randrange(0, 2**32)])
    if rng.random() < 0.05:
        msg = rng.choice([[msg], {"m": msg}])
    return msg


def byte_mutate(data: bytes, rng: random.Random, max_size: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 2 and b:
            pos = rng.randrange(len(b))
            del b[pos:pos + rng.randrange(1, 9)]
        elif op == 3 and b:
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC7, 0xD4, 0xDC, 0xDD, 0xDE,
                                                   0xDF, 0xFF, 0x90, 0x91, 0x94, 0x95])
        elif op == 4 and len(b) >= 4:
            pos = rng.randrange(len(b) - 3)
            b[pos:pos + 4] = struct.pack(">I", rng.choice(INTERESTING_LENGTHS) & 0xFFFFFFFF)
        elif b:
            pos = rng.randrange(len(b))
            b[pos:pos] = b[pos:pos + rng.randrange(1, 32)]
    return bytes(b[:max_size])


def mutate(data: bytes, rng: random.Random, max_size: int = MAX_LEN, byte_level=None, other: bytes | None = None):
    """One structure-aware mutation of a stream of frames (``byte_level(data, max_size)`` for raw edits)."""
    r = rng.random()
    items, _ = split_frames(data)
    bodies = [b for b in items if type(b) is not int]
    if r < 0.45 and bodies:
        i = rng.randrange(len(bodies))
        try:
            msg = msgpack.unpackb(bodies[i], strict_map_key=False, raw=False,
                                  ext_hook=lambda c, d: msgpack.ExtType(c, d) if c >= 0 else None)
        except Exception:
            msg = seed_messages(rng)
        try:
            bodies[i] = wire.pack(mutate_message(msg, rng))
        except Exception:
            bodies[i] = wire.pack(seed_messages(rng))
        out = b"".join(frame(b) for b in bodies)
    elif r < 0.65:
        frames = [frame(b) for b in bodies] or [frame(wire.pack(seed_messages(rng)))]
        op = rng.randrange(5)
        if op == 0:
            frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
        elif op == 1 and len(frames) > 1:
            del frames[rng.randrange(len(frames))]
        elif op == 2:
            frames.append(frame(wire.pack(seed_messages(rng))))
        elif op == 3 and other:
            frames.append(other[:rng.randrange(len(other) + 1)])
        else:
            j = rng.randrange(len(frames))
            n = rng.choice(INTERESTING_LENGTHS + [len(frames[j]) - 4 + rng.randrange(-3, 4)]) & 0xFFFFFFFF
            frames[j] = struct.pack(">I", n) + frames[j][4:]
        out = b"".join(frames)
    else:
        out = byte_level(data, max_size) if byte_level is not None else byte_mutate(data, rng, max_size)
    return out[:max_size]


# ------------------------------------------------------------------ the in-process target
class StubTransport:
    """Records writes; enough of an asyncio transport for a QueryConnection."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.chunks.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Replica:
    """An in-process replica of the row-sum model: answers each batch on the next loop turn."""

    def __init__(self, replica_id: int) -> None:
        self.replica_id = replica_id
        self.pid = None
        self.batch = None
        self.batch2 = None
        self.sizer = None
        self.dead = False


class InProcTarget:
    """A real query connection, server and processor on a uvloop loop; one fresh connection per input."""

    def __init__(self) -> None:
        from clipper.config import Limits
        from clipper.management.registry import Application
        from clipper.query.batching import ModelQueue
        from clipper.query.processor import AppRoute, QueryProcessor
        from clipper.server.query_server import QueryServer

        # asyncio's own loop: uvloop sets up its signal wakeup (a socketpair) on every run_until_complete,
        # which would cost more than the target itself; the frontend's parts do not care which loop runs them.
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        asyncio.events._set_running_loop(self.loop)  # it is stepped by hand (_turns): code on it may ask for it
        self.loop_errors: list = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        import logging

        # The server logs every INTERNAL_ERROR with its traceback; the replies are checked instead.
        logging.getLogger("clipper.server").setLevel(logging.CRITICAL)
        self.limits = Limits(max_frame_bytes=MAX_FRAME, max_input_bytes=16 * 1024)
        self.processor = QueryProcessor(self.loop, self.limits.max_input_bytes, cache_bytes=1 << 20,
                                        feedback_timeout_ms=50)

        def send_batch(replica, batch):
            outs = [float(np.asarray(q.input, dtype=np.float64).sum()) for q in batch.queries]
            self.loop.call_soon(queue.deliver, replica, batch, outs)

        queue = ModelQueue("m:1", self.loop, send_batch, deployment_id=1, max_queue_length=1000, max_batch_retries=1,
                           max_batch=8, cache=self.processor.cache)
        queue.add_replica(_Replica(1))
        self.processor.queues["m:1"] = queue
        apps = [
            (Application(APP, "float32", (4,), slo_ms=50.0, default_output=-1.0), [("m", queue)]),
            (Application("fz-exp4", "float32", (4,), slo_ms=50.0, default_output=-1.0, policy="exp4", cache=False),
             [("m", queue), ("gone", None)]),
            (Application("fz-bytes", "bytes", (), slo_ms=50.0, default_output=b""), []),
            (Application("fz-str", "str", (), slo_ms=50.0, on_deadline="error"), []),
        ]
        for app, links in apps:
            route = AppRoute(app, self.processor)
            self.processor.routes[app.name] = route
            route.set_links(links)
        self.server = QueryServer(self.loop, self.processor, self.limits, "clipper/fuzz")
        self.connection_class = QueryServer.connection_class
        self.unpack = wire.make_unpacker()
        self.lingering: list = []  # connections with queries still waiting (answered at their deadline)
        self.replies: dict[str, int] = {}
        self.known: dict[str, int] = {}  # KNOWN_BUGS seen (counted, not raised, while count_known)
        self.count_known = True

    def _turns(self, conn, max_turns: int = 64) -> None:
        """Run the loop's ready callbacks (and due timers) until ``conn`` has nothing more to write now.

        The loop is stepped by hand (``_run_once`` only while callbacks are ready, so it never blocks):
        ``run_until_complete`` per input would cost more than the target."""
        loop = self.loop
        for _ in range(max_turns):
            if not loop._ready and not (loop._scheduled and loop._scheduled[0].when() <= loop.time()):
                return
            loop._run_once()

    def _collect(self, conn, sent: set) -> int:
        data = b"".join(conn.transport.chunks)
        conn.transport.chunks.clear()
        items, rest = split_frames(data, 1 << 30)
        if rest:
            raise Finding(f"the server wrote a partial frame ({rest} bytes left over)")
        for body in items:
            try:
                msg = self.unpack(body)
            except E.ClipperError as exc:
                raise Finding(f"the server wrote a reply that does not decode: {exc}") from None
            bug = known_bug(msg) if self.count_known else None
            if bug is not None:
                self.known[bug] = self.known.get(bug, 0) + 1
            else:
                check_reply(msg, sent)
            key = str(msg[0]) if msg[0] != wire.ERROR else f"ERROR {msg[2]}"
            self.replies[key] = self.replies.get(key, 0) + 1
        return len(items)

    def __call__(self, data: bytes) -> None:
        conn = self.connection_class(self.server)
        conn.connection_made(StubTransport())
        items, _ = split_frames(data)
        sent = request_ids(items)
        conn._fuzz_sent = sent
        try:
            conn.data_received(data)
        except Exception as exc:
            raise Finding(f"data_received raised {type(exc).__name__}: {exc}") from exc
        self._turns(conn)
        got = self._collect(conn, sent)
        if got + conn.pending != len(items):
            raise Finding(f"{len(items)} frames got {got} replies with {conn.pending} still pending")
        if conn.pending:
            conn._fuzz_deadline = time.monotonic() + 0.5
            self.lingering.append(conn)
        else:
            conn.connection_lost(None)
        if self.lingering and (len(self.lingering) > 64 or self.lingering[0]._fuzz_deadline < time.monotonic()):
            self.sweep()
        if self.loop_errors:
            raise Finding(f"the event loop reported: {self.loop_errors[0].get('message')}: "
                          f"{self.loop_errors[0].get('exception')!r}")

    def sweep(self, wait_s: float = 0.0) -> None:
        """Let deadlines pass; every lingering query must have its answer by then."""
        if wait_s:
            time.sleep(wait_s)
        now = time.monotonic()
        keep = []
        for conn in self.lingering:
            self._turns(conn, 16)
            self._collect(conn, conn._fuzz_sent)
            if conn.pending:
                if conn._fuzz_deadline < now:
                    raise Finding(f"{conn.pending} queries unanswered 0.5 s after their arrival (SLO 50 ms)")
                keep.append(conn)
            else:
                conn.connection_lost(None)
        self.lingering = keep


# ------------------------------------------------------------------ the live target
class LiveTarget:
    """A ``clipper start`` subprocess; inputs go over sockets."""

    def __init__(self, tmp: Path, clipper_cmd: list[str]) -> None:
        from .harness import NOOP_TOML, RssSampler, write_deployment
        from .run import clipper_server

        cfg = write_deployment(NOOP_TOML, tmp / "fuzz.toml", limits={"max_frame_bytes": MAX_FRAME},
                               extra_models=[{"name": "fzm", "version": "1", "input_dtype": "float32",
                                              "input_shape": [4], "entry": f"{NOOP_TOML.parent / 'noop.py'}:predict",
                                              "replicas": 1, "max_batch": 8}],
                               extra_apps=[{"name": APP, "input_dtype": "float32", "input_shape": [4], "slo_ms": 100,
                                            "default_output": -1.0},
                                           {"name": "fz-bytes", "input_dtype": "bytes", "slo_ms": 100,
                                            "default_output": ""},
                                           {"name": "fz-str", "input_dtype": "str", "slo_ms": 100,
                                            "on_deadline": "error"}],
                               extra_links=[{"app": APP, "model": "fzm"}])
        self.server = clipper_server(cfg, tmp, 90, clipper_cmd, "fuzz")
        self.info = self.server.start()
        self.port = int(self.info["query_port"])
        self.rss = RssSampler(self.server.proc.pid, 1.0).start()
        self.conn = None
        self.next_ping = 1 << 40
        self.reader = None
        self.unpack = wire.make_unpacker()
        self.replies: dict[str, int] = {}
        self.known: dict[str, int] = {}
        self.count_known = True

    def _connect(self):
        import socket

        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _recv_until(self, s, reader, pid: int, want: int) -> list:
        out: list = []
        deadline = time.monotonic() + 10
        got_pong = False
        while not (got_pong and len(out) >= want):
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("closed by the server")
            for body in reader.feed(data):
                msg = self.unpack(body)
                out.append(msg)
                got_pong |= msg[0] == wire.PONG and msg[1] == pid
        return out

    def __call__(self, data: bytes) -> None:
        items, rest = split_frames(data)
        whole = rest == 0 and all(type(b) is not int for b in items)
        if not whole:  # a broken stream: on a connection of its own, then the main one must still answer
            s = self._connect()
            try:
                s.sendall(data)
            except OSError:
                pass
            s.close()
            items, data = [], b""
        if self.server.proc.poll() is not None:
            raise Finding(f"the frontend exited ({self.server.proc.returncode})")
        if self.conn is None:
            self.conn = self._connect()
            self.reader = framing.FrameReader(1 << 26)
        self.next_ping += 1
        pid = self.next_ping
        sent = request_ids(items) | {pid}
        try:
            self.conn.sendall(data + frame(wire.pack(wire.ping(pid))))
            replies = self._recv_until(self.conn, self.reader, pid, len(items) + 1)
        except (OSError, ConnectionError) as exc:
            self.conn.close()
            self.conn = None
            # Closed for a connection-level reason: a new connection must be served.
            s = self._connect()
            try:
                s.sendall(frame(wire.pack(wire.ping(1))))
                self._recv_until(s, framing.FrameReader(1 << 20), 1, 1)
            except (OSError, ConnectionError) as exc2:
                raise Finding(f"no PONG on a new connection after {exc!r}: {exc2!r}") from None
            finally:
                s.close()
            return
        for msg in replies:
            bug = known_bug(msg) if self.count_known else None
            if bug is not None:
                self.known[bug] = self.known.get(bug, 0) + 1
            else:
                check_reply(msg, sent)
            key = str(msg[0]) if msg[0] != wire.ERROR else f"ERROR {msg[2]}"
            self.replies[key] = self.replies.get(key, 0) + 1
        if len(replies) != len(items) + 1:
            raise Finding(f"{len(items)} frames and a PING got {len(replies)} replies")

    def close(self) -> dict:
        self.rss.stop()
        if self.conn is not None:
            self.conn.close()
        alive = self.server.proc.poll() is None
        code = self.server.stop()
        return {"alive_at_end": alive, "exit_code": code, "rss": self.rss.summary()}


# ------------------------------------------------------------------ engines
def run_mutate(target, seconds: float, max_inputs: int, rng_seed: int, findings_dir: Path, log) -> dict:
    """The hand-rolled loop: pick a corpus entry, mutate it, run it; keep inputs that made a new reply kind."""
    rng = random.Random(rng_seed)
    corpus = seeds()
    findings = []
    n = 0
    t0 = time.monotonic()
    next_log = t0 + 10
    seen_kinds: set = set()
    while n < max_inputs and time.monotonic() - t0 < seconds:
        base = rng.choice(corpus)
        data = mutate(base, rng, other=rng.choice(corpus))
        n += 1
        try:
            target(data)
        except Finding as exc:
            findings.append(save_finding(findings_dir, data, exc))
            log(f"FINDING: {exc}")
            if len(findings) >= 20:
                break
        kinds = set(target.replies)
        if kinds - seen_kinds and len(corpus) < 4096:
            corpus.append(data)  # a crude coverage signal: a reply kind not seen before
            seen_kinds |= kinds
        elif rng.random() < 0.001 and len(corpus) < 4096:
            corpus.append(data)
        if time.monotonic() > next_log:
            log(f"  {n:,} inputs, {n / (time.monotonic() - t0):,.0f}/s, {len(findings)} findings")
            next_log += 10
    if isinstance(target, InProcTarget):
        try:
            target.sweep(wait_s=0.6)
        except Finding as exc:
            findings.append(save_finding(findings_dir, b"", exc))
    elapsed = time.monotonic() - t0
    return {"engine": "mutate", "inputs": n, "seconds": round(elapsed, 1), "inputs_per_s": round(n / elapsed, 1),
            "corpus": len(corpus), "findings": findings, "known_findings": dict(target.known),
            "replies": dict(sorted(target.replies.items()))}


def save_finding(findings_dir: Path, data: bytes, exc: BaseException) -> dict:
    import hashlib

    findings_dir.mkdir(parents=True, exist_ok=True)
    name = f"finding-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    (findings_dir / name).write_bytes(data)
    return {"kind": type(exc).__name__, "detail": str(exc)[:500], "reproducer": str(findings_dir / name),
            "hex_head": data[:64].hex()}


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except Exception:
        return False
    return True


def _atheris_child(args) -> None:
    """Runs inside the child process: libFuzzer drives the in-process target."""
    import atheris

    with atheris.instrument_imports(include=["clipper"]):
        import clipper.query.processor
        import clipper.server.query_server  # noqa: F401
    target = InProcTarget()
    target.count_known = not args.stop_on_known
    rng = random.Random(args.seed)
    stats_path = Path(args.stats_file)
    count = [0, time.monotonic()]

    def one(data: bytes) -> None:
        target(bytes(data))
        count[0] += 1
        if count[0] % 5000 == 0:
            stats_path.write_text(json.dumps({"inputs": count[0], "seconds": time.monotonic() - count[1],
                                              "replies": target.replies, "known": target.known}))

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng.seed(seed)
        return mutate(bytes(data), rng, min(max_size, MAX_LEN),
                      byte_level=lambda d, m: atheris.Mutate(d, m))

    argv = [sys.argv[0], f"-runs={args.max_inputs}", f"-max_total_time={int(args.seconds)}", f"-max_len={MAX_LEN}",
            "-timeout=20", f"-artifact_prefix={args.findings_dir}/", "-print_final_stats=1", f"-seed={args.seed or 1}",
            args.corpus_dir]
    atheris.Setup(argv, one, custom_mutator=custom_mutator)
    atheris.Fuzz()


def run_atheris(args, findings_dir: Path, log) -> dict:
    corpus = Path(tempfile.mkdtemp(prefix="clipper-fuzz-corpus-"))
    stats = corpus.parent / f"{corpus.name}.stats.json"
    for i, s in enumerate(seeds()):
        (corpus / f"seed-{i:03d}").write_bytes(s)
    findings_dir.mkdir(parents=True, exist_ok=True)
    before = set(findings_dir.iterdir())
    argv = [sys.executable, "-m", "bench.fuzz_protocol", "--atheris-child", "--seconds", str(args.seconds),
            *(["--stop-on-known"] if args.stop_on_known else []),
            "--max-inputs", str(args.max_inputs), "--findings-dir", str(findings_dir), "--seed", str(args.seed),
            "--corpus-dir", str(corpus), "--stats-file", str(stats)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=args.seconds + 300)
        out = proc.stdout + proc.stderr
        rc = proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else "", "timeout"
    elapsed = time.monotonic() - t0
    import re

    runs = re.findall(r"Done (\d+) runs in (\d+) second", out)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    n = int(execs[-1]) if execs else (int(runs[-1][0]) if runs else None)
    st = json.loads(stats.read_text()) if stats.exists() else {}
    if n is None:
        n = st.get("inputs")
    findings = []
    for p in sorted(set(findings_dir.iterdir()) - before):
        data = p.read_bytes()
        detail = ""
        m = re.search(r"(=== Uncaught Python exception: ===.*?)(?:\n\n|==\d+==)", out, re.DOTALL)
        if m:
            detail = m.group(1)[-1500:]
        findings.append({"kind": "atheris", "reproducer": str(p), "hex_head": data[:64].hex(), "detail": detail})
    shutil.rmtree(corpus, ignore_errors=True)
    stats.unlink(missing_ok=True)
    log(out[-3000:] if rc not in (0,) else out[-800:])
    fuzz_seconds = int(runs[-1][1]) if runs else elapsed
    return {"engine": "atheris", "inputs": n, "seconds": round(elapsed, 1),
            "inputs_per_s": round(n / max(fuzz_seconds, 1e-9), 1) if n else None, "exit_code": rc,
            "findings": findings, "known_findings": st.get("known"), "replies": st.get("replies"),
            "libfuzzer_tail": out[-1500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz_protocol", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("inproc", "live"), default="inproc")
    ap.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto",
                    help="atheris (libFuzzer; inproc only) or the hand-rolled mutation loop; auto: atheris if it imports")
    ap.add_argument("--seconds", type=float, default=300.0, help="stop after this long")
    ap.add_argument("--max-inputs", type=int, default=10_000_000, help="... or after this many inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings-dir", type=Path, default=None,
                    help="where reproducers go (default: a new folder under the system's temporary folder)")
    ap.add_argument("--stop-on-known", action="store_true",
                    help="treat the bugs in KNOWN_BUGS as findings too (default: count them and go on)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz-protocol.json")
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    ap.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stats-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.atheris_child:
        _atheris_child(args)
        return 0
    findings_dir = args.findings_dir or Path(tempfile.mkdtemp(prefix="clipper-fuzz-findings-"))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    engine = args.engine
    if engine == "auto":
        engine = "atheris" if args.mode == "inproc" and atheris_available() else "mutate"
    if engine == "atheris" and (args.mode != "inproc" or not atheris_available()):
        ap.error("--engine atheris needs --mode inproc and an importable atheris (pip install atheris)")
    from .run import machine_info

    report: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "machine": machine_info(), "note": args.note, "mode": args.mode,
                    "atheris_available": atheris_available(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(tempfile.mkdtemp(prefix="clipper-fuzz-"))
    try:
        if engine == "atheris":
            res = run_atheris(args, findings_dir, log)
        else:
            target = InProcTarget() if args.mode == "inproc" else LiveTarget(tmp, args.clipper_cmd.split())
            target.count_known = not args.stop_on_known
            try:
                res = run_mutate(target, args.seconds, args.max_inputs, args.seed, findings_dir, log)
            finally:
                if isinstance(target, LiveTarget):
                    report["frontend"] = target.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.update(res)
    report["findings_dir"] = str(findings_dir) if res["findings"] else None
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    if not res["findings"] and args.findings_dir is None:
        shutil.rmtree(findings_dir, ignore_errors=True)
    print(f"fuzz {args.mode}/{engine}: {res['inputs']:,} inputs in {res['seconds']} s "
          f"({res['inputs_per_s']:,} /s); {len(res['findings'])} findings"
          + (f"; known bugs seen: {res['known_findings']}" if res.get("known_findings") else "")
          + (f" (reproducers in {findings_dir})" if res["findings"] else ""))
    print(f"report: {args.out}")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
