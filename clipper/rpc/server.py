"""The frontend's side of the container RPC: ZeroMQ ROUTER sockets, one per transport.

Containers connect (DEALER), introduce themselves with C_HELLO and become
:class:`Replica` objects of their model version's queue. Batches go out as a
header frame plus one payload frame, the batch's inputs assembled into one
buffer; a payload of 256 KiB or more is handed to ZeroMQ without a copy, a
smaller one is copied into ZeroMQ's message (cheaper than pyzmq's zero-copy
release: :mod:`clipper.rpc.zio`). Results come back the same way and are
viewed with ``np.frombuffer`` on the received bytes.

Trust (docs/security.md): nothing a container says about itself is believed.
With ``rpc_security = "curve"`` every handshake is checked by the ZAP handler
of :mod:`clipper.security.container_keys`; a peer without a credential never
completes one. Every message then carries its credential's id (ZeroMQ's
``User-Id``), and a hello is accepted only for the model (and version) that
credential was issued for. The hello's other fields (pid, dtype, shape, sdk,
protocol version, the model's load time and resident memory) are validated, typed and bounded; a bad one gets F_REJECT
and changes nothing else. A claimed pid is only shown, never signalled: a
replica that hangs is dropped, told to exit, and, if the local manager
started it, killed through the manager's own process handle.

Two transports may serve at once: TCP (``rpc_port``, CURVE: encrypted) for
containers anywhere, and a Unix socket in a private folder (PLAIN: the kernel
keeps it private, no per-message cryptography) for the local manager's
children.

Liveness: heartbeats both ways every ``heartbeat_interval_ms``; a container
silent for ``heartbeat_timeout_ms``, holding a batch longer than
``batch_timeout_ms``, or whose process the manager saw exit, is dropped, and
its batches in flight are retried on another replica or failed.

A replica may hold two batches (``batches_in_flight``): the container reads
the second from its socket while it runs the first and answers them in
order; an answer names its batch id, so one for either is accepted.

Each socket is driven by the event loop: ``add_reader`` on ZeroMQ's
edge-triggered FD, drained until ``EVENTS`` has no POLLIN, and re-checked
after every send (a send can consume the edge).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import Callable

import msgpack
import numpy as np
import zmq

from .._native import framing
from ..errors import ClipperError, InvalidConfigError, ModelError, WrongOutputCountError, error_for_code
from ..management.registry import INPUT_DTYPES, NAME_RE, NAME_RULE
from ..protocol import wire
from ..security.container_keys import ZAP_DOMAIN
from . import messages as m
from . import zio

log = logging.getLogger("clipper.rpc")

_POLLIN = zio.POLLIN
_NOBLOCK = zio.NOBLOCK
_events = zio.events
_recv_parts = zio.recv_parts
_send_parts = zio.send_parts

# A one-dimensional output block of these dtypes is read with memoryview.cast where this machine's byte
# order is the wire's (little-endian): the same Python numbers numpy's tolist() makes, without numpy.
_LIST_FORMATS = ({"|b1": "?", "|i1": "b", "|u1": "B", "<i2": "h", "<u2": "H", "<i4": "i", "<u4": "I",
                  "<i8": "q", "<u8": "Q", "<f4": "f", "<f8": "d"} if sys.byteorder == "little" else {})


def ndarray_outputs(payload, dtype: np.dtype, typestr: str, shape: list) -> list:
    """A batch's outputs from an ``nd`` result block: a list of Python numbers for one dimension, else
    a list of one array per query (views of the block). ValueError or TypeError when the block's size
    is not the shape's."""
    fmt = _LIST_FORMATS.get(typestr) if len(shape) == 1 else None
    if fmt is not None:
        out = memoryview(payload).cast(fmt).tolist()  # type: ignore[call-overload]  # (size not a multiple of the item's: TypeError)
        if len(out) != shape[0]:
            raise ValueError(f"an output block of {len(out)} items for shape {shape}")
        return out
    arr = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return arr.tolist() if arr.ndim == 1 else list(arr)


__all__ = ["Replica", "ContainerServer"]

# Bounds of a header frame (hello, result, error, heartbeat): small by construction.
MAX_HEADER_BYTES = 65536
# Parts of a container's message with the routing id: [routing id, header, payload?]. ZeroMQ bounds each part
# (ZMQ_MAXMSGSIZE = max_rpc_message_bytes), not their number: parts past these are dropped uncopied and the
# message refused.
MAX_MESSAGE_PARTS = 3
MAX_ERROR_MESSAGE_CHARS = 4096
MAX_SHAPE_DIMS = 32
MAX_PID = 2**31 - 1
MAX_LOAD_MS = 7 * 24 * 3600 * 1000.0  # a model's claimed load time: at most a week
MAX_RSS_BYTES = 2**50  # its claimed resident memory: at most 1 PiB
_unpack_header = functools.partial(
    msgpack.unpackb, raw=False, strict_map_key=True, max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
    max_array_len=MAX_SHAPE_DIMS + 8, max_map_len=32, max_ext_len=0)


class Replica:
    """One connected model container."""

    __slots__ = ("channel", "ident", "replica_id", "key", "grant", "claimed_pid", "peer", "queue", "batch", "batch2", "sizer",
                 "dead", "last_seen_ns", "connected_ns", "batches_done", "sdk", "lat_ewma_ns",
                 "variable", "load_ms", "rss_bytes")

    def __init__(self, channel: "_Channel", ident: bytes, replica_id: int, key: str, grant, queue):
        self.channel = channel
        self.ident = ident
        self.replica_id = replica_id
        self.key = key
        self.grant = grant  # the credential it proved (None only with rpc_security = "none" and no credential)
        self.claimed_pid = None  # what its hello says: shown, never acted on
        self.peer = None  # the address its connection comes from
        self.sdk = None
        self.load_ms = None  # what its hello says its model took to load, and its resident memory then: shown only
        self.rss_bytes = None
        self.queue = queue
        self.batch = None  # the (oldest) batch in flight, if any
        self.batch2 = None  # a batch sent behind it (batches_in_flight = 2), if any
        self.sizer = None  # its batch-size controller, set by the queue
        self.lat_ewma_ns = 0.0  # its batch latency, smoothed (the queue's admission estimate)
        self.dead = False
        self.last_seen_ns = self.connected_ns = time.monotonic_ns()
        self.batches_done = 0
        self.variable = False  # its model's shape has a free dimension: batches go as "vl" arrays

    @property
    def pid(self) -> int | None:
        """The process id the local manager knows for it (None for a container it did not start)."""
        grant = self.grant
        return grant.pid if grant is not None and grant.origin == "manager" else None

    def __repr__(self) -> str:
        where = f"pid {self.pid}" if self.pid is not None else f"from {self.peer or '?'}"
        return f"<Replica {self.replica_id} {self.key} {where}>"


class _Channel:
    """One ROUTER socket and the replicas connected through it."""

    __slots__ = ("name", "sock", "fd", "endpoint", "secure", "replicas", "check_scheduled")

    def __init__(self, name: str, sock: zmq.Socket, secure: bool) -> None:
        self.name = name  # "tcp" or "ipc"
        self.sock = sock
        self.fd = sock.getsockopt(zmq.FD)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.secure = secure  # messages carry a User-Id set by the ZAP handler
        self.replicas: dict[bytes, Replica] = {}
        self.check_scheduled = False


class HelloError(ClipperError):
    """A hello that cannot be accepted (sent back in F_REJECT)."""


def parse_hello(header) -> dict:
    """Check a C_HELLO header; returns its info with every field typed and bounded."""
    if type(header) is not list or len(header) != 3:
        raise HelloError("a hello is [1, rpc_version, info]")
    version, info = header[1], header[2]
    if type(version) is not int or version != m.RPC_VERSION:
        raise HelloError(f"container RPC version {version!r} is not supported; this frontend speaks {m.RPC_VERSION}")
    if type(info) is not dict:
        raise HelloError("a hello's info is a map")
    out: dict = {}
    for field in ("model", "version"):
        value = info.get(field)
        if type(value) is not str or not NAME_RE.match(value):
            raise HelloError(f"hello {field} {value!r} is not a {field} name ({NAME_RULE})")
        out[field] = value
    pid = info.get("pid")
    if pid is not None and (type(pid) is not int or not 0 < pid <= MAX_PID):
        raise HelloError(f"hello pid {pid!r} is not a process id (an integer in 1..{MAX_PID})")
    out["pid"] = pid
    dtype = info.get("input_dtype")
    if dtype is not None and (type(dtype) is not str or dtype not in INPUT_DTYPES):
        raise HelloError(f"hello input_dtype {dtype!r} is not one of {list(INPUT_DTYPES)}")
    out["input_dtype"] = dtype
    shape = info.get("input_shape")
    if shape is not None:
        if (type(shape) is not list or len(shape) > MAX_SHAPE_DIMS
                or any(type(d) is not int or not -1 <= d <= MAX_PID for d in shape)):
            raise HelloError(f"hello input_shape {shape!r} is not a list of at most {MAX_SHAPE_DIMS} "
                             "non-negative integers (or -1, a dimension of any length)")
        shape = tuple(shape)
    out["input_shape"] = shape
    load_ms = info.get("load_ms")
    if load_ms is not None and (type(load_ms) not in (int, float) or not 0 <= load_ms <= MAX_LOAD_MS):
        raise HelloError(f"hello load_ms {load_ms!r} is not a number of milliseconds in 0..{MAX_LOAD_MS:.0f}")
    out["load_ms"] = None if load_ms is None else round(float(load_ms), 3)
    rss = info.get("rss_bytes")
    if rss is not None and (type(rss) is not int or not 0 <= rss <= MAX_RSS_BYTES):
        raise HelloError(f"hello rss_bytes {rss!r} is not an integer in 0..{MAX_RSS_BYTES}")
    out["rss_bytes"] = rss
    for field, limit in (("sdk", 128), ("credential_id", 64)):
        value = info.get(field)
        if value is not None and (type(value) is not str or len(value) > limit):
            raise HelloError(f"hello {field} is not a string of at most {limit} characters")
        out[field] = value
    return out


class ContainerServer:
    """Accepts model containers and carries batches to them."""

    def __init__(self, loop, address: str, resolve: Callable, *, heartbeat_interval_ms: int,
                 heartbeat_timeout_ms: int, batch_timeout_ms: int, keyring=None, ipc_dir: str | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024) -> None:
        self.loop = loop
        self.address = address
        self._resolve = resolve  # (model, version) -> (ModelQueue, ModelVersion); raises ClipperError to reject
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ns = heartbeat_timeout_ms * 1_000_000
        self.batch_timeout_ns = batch_timeout_ms * 1_000_000
        self.keyring = keyring
        self.secure = keyring is not None and keyring.mode == "curve"
        self.ipc_dir = ipc_dir if self.secure else None
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context()
        self.channels: list[_Channel] = []
        self.tcp: _Channel | None = None
        self.ipc: _Channel | None = None
        self._next_replica_id = 1
        self._hb_timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[str, int, asyncio.Future]] = []
        self._unpack = wire.make_unpacker()
        self.on_replica_change: Callable | None = None
        self.on_hung: Callable | None = None  # (replica) -> None: stop its process, if the manager started it
        self.rejected = 0  # hellos refused
        self.ignored = 0  # messages from peers with no (or a revoked) credential, or malformed
        if keyring is not None:
            keyring.on_revoke = self._on_revoke

    # ------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Bind the sockets; returns the TCP endpoint."""
        addr = self.address
        if addr.endswith(":0"):
            addr = addr[:-2] + ":*"
        try:
            if self.keyring is not None:
                self.keyring.start_authenticator(self.ctx)
            self.tcp = self._bind("tcp", addr, "curve" if self.secure else None)
            if self.ipc_dir is not None:
                self.ipc = self._bind("ipc", f"ipc://{self.ipc_dir}/rpc.sock", "plain")
        except BaseException:
            self.close()  # no thread, socket or bound port left behind
            raise
        self._schedule_check_all()
        return self.tcp.endpoint

    def _bind(self, name: str, addr: str, mechanism: str | None) -> _Channel:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.copy_threshold = zio.COPY_THRESHOLD
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)  # a larger message disconnects its sender
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a peer that does not finish its handshake is cut off
        if mechanism == "curve":
            sock.curve_server = True
            sock.curve_secretkey = self.keyring.secret_key
        elif mechanism == "plain":
            sock.plain_server = True
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        try:
            sock.bind(addr)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise InvalidConfigError(f"the container RPC cannot listen on {addr}: {exc}") from None
        ch = _Channel(name, sock, mechanism is not None)
        self.channels.append(ch)
        self.loop.add_reader(ch.fd, self._on_readable, ch)
        return ch

    @property
    def endpoint(self) -> str | None:
        return self.tcp.endpoint if self.tcp is not None else None

    @property
    def port(self) -> int:
        assert self.tcp is not None  # (bound by start)
        return int(self.tcp.endpoint.rsplit(":", 1)[1])

    @property
    def local_endpoint(self) -> tuple[str, str]:
        """Where the local manager's children connect, and with which mechanism."""
        if self.ipc is not None:
            return self.ipc.endpoint, "plain"
        assert self.tcp is not None  # (bound by start)
        return self.tcp.endpoint, "curve" if self.secure else "none"

    @property
    def replicas(self) -> dict:
        """Every connected replica (a new dict: for status and tests, not the hot path)."""
        out = {}
        for ch in self.channels:
            out.update({(ch.name, ident): r for ident, r in ch.replicas.items()})
        return out

    def all_replicas(self) -> list[Replica]:
        return [r for ch in self.channels for r in ch.replicas.values()]

    def close(self) -> None:
        if self.ctx.closed:
            return
        if self._hb_timer is not None:
            self._hb_timer.cancel()
            self._hb_timer = None
        for replica in self.all_replicas():
            self._drop(replica, "was disconnected because the frontend stopped", logging.INFO)
        for ch in self.channels:
            try:
                self.loop.remove_reader(ch.fd)
            except Exception:
                pass
            ch.sock.close(linger=0)
        self.channels.clear()
        if self.keyring is not None:
            self.keyring.stop()
        self.ctx.term()
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

    # ------------------------------------------------------------ socket I/O
    def _schedule_check_all(self) -> None:
        for ch in self.channels:
            self._schedule_check(ch)

    def _schedule_check(self, ch: _Channel) -> None:
        if not ch.check_scheduled:
            ch.check_scheduled = True
            self.loop.call_soon(self._on_readable, ch)

    def _on_readable(self, ch: _Channel) -> None:
        ch.check_scheduled = False
        sock = ch.sock
        if sock.closed:
            return
        # Ask EVENTS before each receive instead of catching zmq.Again: an
        # exception per wake-up costs more than the whole message handling.
        for _ in range(10_000):
            try:
                if not _events(sock) & _POLLIN:
                    return
                # [routing id, header, payload?]: the header a Frame (its User-Id and Peer-Address are read),
                # the rest bytes (no Frame to make and free); parts past those three are dropped uncopied
                # (a None in their place: the message is refused)
                frames = _recv_parts(sock, _NOBLOCK, 0b010, MAX_MESSAGE_PARTS)
            except zmq.ZMQError:
                return
            try:
                self._handle(ch, frames)
            except Exception:  # one bad message never stops the socket
                self.ignored += 1
                log.exception("dropping a container message that could not be handled")
        self._schedule_check(ch)  # more to read: yield to other work, come back soon

    def _send(self, ch: _Channel, ident: bytes, frames: list) -> None:
        sock = ch.sock
        try:
            # NOBLOCK: a ROUTER with no high-water mark never waits (the GIL is kept across the parts)
            _send_parts(sock, [ident, *frames], _NOBLOCK)
        except zmq.ZMQError:
            # Even a failed send (a peer gone: EHOSTUNREACH) handled the socket's pending commands first and
            # took the FD's edge with them: whatever waits is read on a later turn.
            self._schedule_check(ch)
            raise
        # The same after a send that went out: what it left readable is read on a later turn, and nothing
        # else is scheduled for a send.
        if not ch.check_scheduled and _events(sock) & _POLLIN:
            self._schedule_check(ch)

    def _send_header(self, ch: _Channel, ident: bytes, header: list) -> None:
        try:
            self._send(ch, ident, [msgpack.packb(header)])
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------ messages
    def _handle(self, ch: _Channel, frames) -> None:
        if len(frames) < 2 or frames[-1] is None or len(frames[1]) > MAX_HEADER_BYTES:
            self.ignored += 1
            replica = ch.replicas.get(frames[0]) if len(frames) > 2 and frames[-1] is None else None
            if replica is not None and replica.batch is not None and (
                    not ch.secure or frames[1].get("User-Id") == replica.grant.id):
                self._fail_batch(replica, replica.batch, ModelError(
                    f"model {replica.key}: its container sent a message of more than {MAX_MESSAGE_PARTS} parts"))
            return
        ident = frames[0]
        head = frames[1]
        uid = head.get("User-Id") if ch.secure else None
        replica = ch.replicas.get(ident)
        if replica is not None and ch.secure and uid != replica.grant.id:
            # Another connection took this routing id (a peer may choose its own): not this replica.
            self.ignored += 1
            return
        try:
            header = _unpack_header(head.bytes)
            kind = header[0]
            if type(kind) is not int:
                raise ValueError
        except Exception:
            self.ignored += 1
            if replica is not None and replica.batch is not None:
                self._fail_batch(replica, replica.batch, ModelError(
                    f"model {replica.key}: its container sent a message that is not a valid header"))
            return
        if replica is not None:
            replica.last_seen_ns = time.monotonic_ns()
            if kind == m.C_RESULT:
                self._on_result(replica, header, frames[2] if len(frames) > 2 else b"")
            elif kind == m.C_ERROR:
                self._on_error(replica, header)
            elif kind == m.C_HELLO:
                self._on_hello(ch, ident, uid, header, head)
            elif kind == m.C_BYE:
                self._drop(replica, "shut down", logging.INFO)  # it said goodbye: stopped on purpose
            return  # C_HEARTBEAT: being heard is all that counts
        if kind == m.C_HELLO:
            self._on_hello(ch, ident, uid, header, head)
        elif kind in (m.C_RESULT, m.C_HEARTBEAT) and (not ch.secure or self.keyring.get(uid) is not None):
            # A container the frontend forgot (say, after a restart): ask it to introduce itself.
            self._send_header(ch, ident, [m.F_REHELLO])
        else:
            self.ignored += 1

    def _on_hello(self, ch: _Channel, ident: bytes, uid, header, head) -> None:
        old = ch.replicas.get(ident)
        if old is not None:
            self._drop(old, "reconnected", logging.INFO)
        keyring = self.keyring
        try:
            info = parse_hello(header)
            if ch.secure:
                grant = keyring.get(uid)
                if grant is None:  # revoked since its handshake: it is told so, and gets nothing else
                    raise HelloError("its credentials were revoked")
            else:  # rpc_security = "none": the credential id it names is believed (loopback only)
                grant = keyring.get(info["credential_id"]) if keyring is not None else None
            model, version = info["model"], info["version"]
            if grant is not None and not grant.allows(model, version):
                raise HelloError(f"credentials {grant.id} were issued for model {grant.names()}; "
                                 f"they cannot register model {model}:{version}")
            queue, mv = self._resolve(model, version)
            dtype, shape = info["input_dtype"], info["input_shape"]
            if dtype is not None and dtype != mv.input_dtype:
                raise HelloError(f"container expects input dtype {dtype!r}; model {mv.key} is deployed with "
                                 f"{mv.input_dtype!r}")
            if shape is not None and shape != tuple(mv.input_shape):
                raise HelloError(f"container expects input shape {list(shape)}; model {mv.key} is deployed with "
                                 f"{list(mv.input_shape)}")
        except ClipperError as exc:
            self.rejected += 1
            log.warning("rejecting a container: %s", exc.message)
            return self._send_header(ch, ident, [m.F_REJECT, exc.message])
        replica = Replica(ch, ident, self._next_replica_id, mv.key, grant, queue)
        replica.claimed_pid = info["pid"]
        replica.variable = -1 in mv.input_shape
        replica.sdk = info["sdk"]
        replica.load_ms, replica.rss_bytes = info["load_ms"], info["rss_bytes"]
        try:
            replica.peer = head.get("Peer-Address")
        except zmq.ZMQError:
            pass
        self._next_replica_id += 1
        ch.replicas[ident] = replica
        self._send_header(ch, ident, [m.F_WELCOME, replica.replica_id, {
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "heartbeat_timeout_ms": self.heartbeat_timeout_ns // 1_000_000}])
        queue.add_replica(replica)
        log.info("replica %s connected", replica)
        self._arm_heartbeat()
        self._notify_waiters()
        if self.on_replica_change:
            self.on_replica_change()

    @staticmethod
    def _batch_of(replica: Replica, batch_id):
        """The batch of ``replica`` that ``batch_id`` names; None for a late answer to one already
        retried elsewhere. Containers answer in order, but one answering the second batch first
        is served as well."""
        batch = replica.batch
        if batch is not None and batch.batch_id == batch_id:
            return batch
        batch = replica.batch2
        if batch is not None and batch.batch_id == batch_id:
            return batch
        return None

    def _on_result(self, replica: Replica, header: list, payload) -> None:
        batch = replica.batch
        if batch is None:
            return
        try:
            if len(header) != 5:
                raise ModelError(f"model {replica.key}: its container sent a malformed result header")
            _, batch_id, count, encoding, meta = header
            if batch_id != batch.batch_id:
                batch = self._batch_of(replica, batch_id)
                if batch is None:
                    return  # a late answer for a batch already retried elsewhere
            queries = batch.queries
            if count != len(queries):
                raise WrongOutputCountError(
                    f"model {replica.key} returned {count!r} outputs for a batch of {len(queries)} inputs")
            if encoding == m.ENC_NDARRAY:
                typestr, shape = meta
                dtype = wire.ALLOWED_DTYPES[typestr]
                if type(shape) is not list or not shape or type(shape[0]) is not int or shape[0] != count:
                    raise ModelError(f"model {replica.key}: output shape {shape!r} does not hold {count} outputs")
                outputs = ndarray_outputs(payload, dtype, typestr, shape)
            elif encoding == m.ENC_MSGPACK:
                outputs = self._unpack(payload)
                if not isinstance(outputs, list) or len(outputs) != len(queries):
                    raise WrongOutputCountError(f"model {replica.key} returned a malformed output block")
            else:
                raise ModelError(f"model {replica.key}: output encoding {encoding!r} is not known")
        except ClipperError as exc:
            return self._fail_batch(replica, batch, exc)
        except Exception as exc:
            return self._fail_batch(replica, batch, ModelError(
                f"model {replica.key}: its outputs cannot be decoded: {type(exc).__name__}: {exc}"))
        replica.batches_done += 1
        replica.queue.deliver(replica, batch, outputs)

    def _on_error(self, replica: Replica, header: list) -> None:
        batch = replica.batch
        if batch is None:
            return
        if len(header) != 4 or type(header[2]) is not int or type(header[3]) is not str:
            exc = ModelError(f"model {replica.key}: its container sent a malformed error")
        else:
            _, batch_id, code, message = header
            batch = self._batch_of(replica, batch_id)
            if batch is None:
                return
            message = message[:MAX_ERROR_MESSAGE_CHARS]
            exc = error_for_code(code, f"model {replica.key}: {message}")
            if not isinstance(exc, ModelError):
                exc = ModelError(f"model {replica.key}: {message}")
        self._fail_batch(replica, batch, exc)

    def _fail_batch(self, replica: Replica, batch, exc: ClipperError) -> None:
        replica.queue.fail_batch(replica, batch, exc)

    # ------------------------------------------------------------ batches
    def send_batch(self, replica: Replica, batch) -> None:
        """Send ``batch`` to ``replica`` (the ModelQueue's transport)."""
        queries = batch.queries
        first = queries[0].input
        n = len(queries)
        inputs = [q.input for q in queries]
        if isinstance(first, np.ndarray) and not replica.variable:
            payload = framing.assemble_batch(inputs, first.nbytes)
            meta = [wire._TYPESTR[first.dtype].decode(), [n, *first.shape]]
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_NDARRAY, meta])
        elif isinstance(first, np.ndarray):  # a shape with a free dimension: one buffer, offsets and shapes
            payload = framing.assemble_arrays(inputs, first.ndim)
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_VARLEN,
                                    ["array", wire._TYPESTR[first.dtype].decode(), first.ndim]])
        elif type(first) is bytes or type(first) is str:  # an application's inputs are all one kind
            payload = framing.assemble_varlen(inputs)
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_VARLEN,
                                    ["bytes" if type(first) is bytes else "str"]])
        else:
            payload = wire.pack(inputs)
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_MSGPACK, None])
        self._send(replica.channel, replica.ident, [header, payload])

    # ------------------------------------------------------------ liveness
    def _arm_heartbeat(self) -> None:
        if self._hb_timer is None and any(ch.replicas for ch in self.channels):
            self._hb_timer = self.loop.call_later(self.heartbeat_interval_ms / 1000, self._heartbeat)

    def _heartbeat(self) -> None:
        self._hb_timer = None
        now = time.monotonic_ns()
        beat = msgpack.packb([m.F_HEARTBEAT])
        for replica in self.all_replicas():
            if now - replica.last_seen_ns > self.heartbeat_timeout_ns:
                self._drop(replica, f"went silent for over {self.heartbeat_timeout_ns // 1_000_000} ms")
                continue
            batch = replica.batch
            if batch is not None and now - batch.sent_ns > self.batch_timeout_ns:
                # Hung: tell it to exit and drop it (its batch goes to another replica). Its claimed pid
                # means nothing; if the manager started it, the manager stops it through its own handle.
                self._send_header(replica.channel, replica.ident,
                                  [m.F_REJECT, "batch timeout: the frontend dropped this replica"])
                self._drop(replica, f"held a batch for over {self.batch_timeout_ns // 1_000_000} ms")
                if self.on_hung is not None:
                    try:
                        self.on_hung(replica)
                    except Exception:  # the liveness checks of every other replica go on
                        log.exception("stopping the hung replica %s failed", replica)
                continue
            try:
                self._send(replica.channel, replica.ident, [beat])
            except zmq.ZMQError:
                self._drop(replica, "became unreachable")
        self._arm_heartbeat()

    def _drop(self, replica: Replica, reason: str, level: int = logging.WARNING) -> None:
        """Forget ``replica``; ``level``: INFO for what happens on purpose (a stop, a rescale, a delete)."""
        ch = replica.channel
        if ch.replicas.get(replica.ident) is not replica:
            return
        del ch.replicas[replica.ident]
        replica.dead = True
        log.log(level, "replica %s %s", replica, reason)
        replica.queue.remove_replica(replica, reason)
        if self.on_replica_change:
            self.on_replica_change()

    def _on_revoke(self, grant, reason: str) -> None:
        """A credential was revoked (by an operator, or its process exited): drop its replicas."""
        for replica in self.all_replicas():
            if replica.grant is grant:
                self._send_header(replica.channel, replica.ident, [m.F_REJECT, reason])
                self._drop(replica, reason)

    def drop_model(self, key: str, reason: str) -> None:
        for replica in self.all_replicas():
            if replica.key == key:
                self._send_header(replica.channel, replica.ident, [m.F_REJECT, reason])
                self._drop(replica, reason)

    # ------------------------------------------------------------ readiness
    def count(self, key: str) -> int:
        return sum(1 for ch in self.channels for r in ch.replicas.values() if r.key == key)

    def wait_for_replicas(self, key: str, n: int) -> asyncio.Future:
        fut = self.loop.create_future()
        self._waiters.append((key, n, fut))
        self._notify_waiters()
        return fut

    def _notify_waiters(self) -> None:
        keep = []
        for key, n, fut in self._waiters:
            if fut.done():
                continue
            if self.count(key) >= n:
                fut.set_result(None)
            else:
                keep.append((key, n, fut))
        self._waiters = keep

    def stats(self) -> list[dict]:
        now = time.monotonic_ns()
        return [{
            "replica_id": r.replica_id,
            "model": r.key,
            "pid": r.pid,
            "claimed_pid": r.claimed_pid,
            "peer": r.peer,
            "transport": r.channel.name,
            "credential": r.grant.id if r.grant is not None else None,
            "busy": r.batch is not None,
            "batches_out": (r.batch is not None) + (r.batch2 is not None),
            "max_batch": r.sizer.current if r.sizer is not None else None,
            "batches_done": r.batches_done,
            "connected_s": round((now - r.connected_ns) / 1e9, 3),
            "load_ms": r.load_ms,  # claimed by the container at its handshake, bounded
            "rss_bytes": r.rss_bytes,
        } for r in self.all_replicas()]

    def security_stats(self) -> dict:
        return {"rpc_security": self.keyring.mode if self.keyring is not None else "none",
                "transports": {ch.name: ch.endpoint for ch in self.channels},
                "handshakes_denied": self.keyring.denied if self.keyring is not None else 0,
                "hellos_rejected": self.rejected, "messages_ignored": self.ignored}
